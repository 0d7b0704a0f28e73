"""The HTTP API (publish, SSE subscribe, health) against the real gateway subprocess."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rapidmq_edge import cli
from rapidmq_edge.broker.message import Message
from rapidmq_edge.ingress import http as http_api
from rapidmq_edge.security.tokens import (
    TokenDB,
    TokensFileError,
    add_token,
    hash_token,
    remove_token,
)

from .conftest import LOOPBACK, free_port
from .gateway_proc import GatewayProcess

V2 = mqtt.CallbackAPIVersion.VERSION2
API = "/api/v1"

GatewayFactory = Callable[..., GatewayProcess]


# --------------------------------------------------------------------------- helpers


class HttpGateway:
    """A gateway with the HTTP API on ``http_port`` and tokens by name."""

    def __init__(self, gw: GatewayProcess, http_port: int, tokens: dict[str, str]) -> None:
        self.gw = gw
        self.http_port = http_port
        self.tokens = tokens

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = None,
        headers: dict[str, str] | None = None, timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], Any]:
        """One request; returns (status, headers, decoded JSON or raw bytes)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            if token is not None:
                hdrs["Authorization"] = f"Bearer {token}"
            data = body
            if isinstance(body, dict | list):
                data = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                decoded: Any = json.loads(raw)
            except ValueError:
                decoded = raw
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, decoded
        finally:
            conn.close()

    def publish(self, token: str | None = None, **fields: Any) -> tuple[int, dict[str, str], Any]:
        return self.request("POST", f"{API}/publish", fields, token)

    def health(self) -> dict[str, Any]:
        status, _, body = self.request("GET", f"{API}/health")
        assert status == 200, body
        assert isinstance(body, dict)
        return body


def start_http_gateway(
    factory: GatewayFactory, tmp_path: Path, tokens: dict[str, str],
    extra: dict[str, Any] | None = None, http: dict[str, Any] | None = None,
) -> HttpGateway:
    """Create the tokens (name -> user) with the tokens module, then start the gateway."""
    tokens_file = tmp_path / f"tokens-{time.monotonic_ns()}.toml"
    plain = {name: add_token(tokens_file, name, user) for name, user in tokens.items()}
    port = free_port()
    config: dict[str, Any] = dict(extra or {})
    config["http"] = {
        "listen": [f"http://{LOOPBACK}:{port}"], "tokens_file": str(tokens_file), **(http or {})
    }
    gw = factory(config=config)
    deadline = time.monotonic() + 20  # the HTTP listener is bound after the MQTT ones
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                break
        except OSError:
            assert gw.proc is not None
            if gw.proc.poll() is not None:
                raise AssertionError(f"gateway exited:\n{gw.log()}") from None
            time.sleep(0.05)
    else:
        raise AssertionError(f"HTTP API did not start within 20 s:\n{gw.log()}")
    return HttpGateway(gw, port, plain)


class Sse:
    """A streaming Server-Sent Events client on http.client with bounded reads."""

    def __init__(self, port: int, filt: str, token: str | None, timeout: float = 5.0) -> None:
        from urllib.parse import quote

        self.conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        self.conn.request("GET", f"{API}/subscribe?filter={quote(filt, safe='')}",
                          headers=headers)
        self.sock = self.conn.sock
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.content_type = self.resp.getheader("Content-Type", "")
        self.comments: list[str] = []

    def ready(self, timeout: float = 5.0) -> None:
        """Wait for the ``: subscribed`` comment sent once the subscription is active."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self._line(deadline)
            if line.startswith(": subscribed"):
                return
        raise AssertionError("no subscribed comment")

    def _line(self, deadline: float) -> str:
        assert self.sock is not None
        self.sock.settimeout(max(0.05, deadline - time.monotonic()))
        raw = self.resp.readline()
        if not raw:
            raise EOFError("stream ended")
        return raw.decode().rstrip("\r\n")

    def next_event(self, timeout: float = 5.0) -> tuple[str, Any]:
        """(event name, decoded data) of the next event; comments are recorded, not returned."""
        deadline = time.monotonic() + timeout
        event, data = "message", []
        while True:
            line = self._line(deadline)
            if line == "":
                if data:
                    return event, json.loads("\n".join(data))
                continue
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())

    def close(self) -> None:
        self.conn.close()


class MqttSub:
    """A paho MQTT 5 subscriber collecting messages."""

    def __init__(self, port: int, topic: str) -> None:
        self.got: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.c = mqtt.Client(V2, client_id=f"sub-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect(LOOPBACK, port)
        self.c.loop_start()
        self.c.subscribe(topic, qos=1)
        assert self.ready.wait(5), "subscription not acknowledged"

    def _msg(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append(m)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= n:
                    break
            time.sleep(0.02)
        with self.lock:
            return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def mqtt_publish(port: int, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish at QoS 1 and wait for the PUBACK (bounded)."""
    c = mqtt.Client(V2, client_id=f"pub-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    c.connect(LOOPBACK, port)
    c.loop_start()
    try:
        info = c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def api(gateway_factory: GatewayFactory, tmp_path: Path) -> HttpGateway:
    """A gateway (anonymous MQTT allowed, no ACL) with token ``main`` for user ``alice``."""
    return start_http_gateway(gateway_factory, tmp_path, {"main": "alice"})


@pytest.fixture
def streams() -> Iterator[list[Sse]]:
    """SSE clients to close at teardown."""
    opened: list[Sse] = []
    yield opened
    for s in opened:
        s.close()


# --------------------------------------------------------------------------- tests


def test_health_needs_no_token(api: HttpGateway) -> None:
    body = api.health()
    assert body["ok"] is True
    assert body["status"] == "ok"
    assert body["gateway"] == "test-gw"
    assert isinstance(body["uptime"], int) and body["uptime"] >= 0
    assert body["clients_connected"] == 0
    assert body["forwarding"] is None
    status, headers, _ = api.request("GET", f"{API}/health", token="garbage")
    assert status == 200  # a token, even a bad one, does not matter here


def test_publish_reaches_mqtt5_subscriber(api: HttpGateway) -> None:
    sub = MqttSub(api.gw.port, "http/#")
    try:
        status, headers, body = api.publish(
            api.tokens["main"], topic="http/t1", payload='{"t": 21.5}',
            content_type="application/json", user_properties={"site": "b7"},
        )
        assert status == 200, body
        assert body == {"ok": True, "receivers": 1}
        assert headers["content-type"].startswith("application/json")
        binary = bytes(range(256))
        status, _, body = api.publish(
            api.tokens["main"], topic="http/t2", payload=base64.b64encode(binary).decode(),
            encoding="base64", qos=0,
        )
        assert status == 200, body
        got = sub.wait_for(2)
        assert len(got) == 2, got
        first = next(m for m in got if m.topic == "http/t1")
        assert first.payload == b'{"t": 21.5}'
        assert first.qos == 1
        assert first.properties.ContentType == "application/json"
        assert ("site", "b7") in first.properties.UserProperty
        second = next(m for m in got if m.topic == "http/t2")
        assert second.payload == binary
        assert second.qos == 0
    finally:
        sub.close()


def test_publish_without_subscribers_and_retained(api: HttpGateway) -> None:
    status, _, body = api.publish(api.tokens["main"], topic="nobody/here", payload="x")
    assert (status, body) == (200, {"ok": True, "receivers": 0})
    status, _, body = api.publish(
        api.tokens["main"], topic="kept/1", payload="last", retain=True
    )
    assert status == 200, body
    sub = MqttSub(api.gw.port, "kept/#")
    try:
        got = sub.wait_for(1)
        assert [(m.topic, m.payload, m.retain) for m in got] == [("kept/1", b"last", True)]
    finally:
        sub.close()


def test_mqtt_publish_reaches_sse_retained_first(api: HttpGateway, streams: list[Sse]) -> None:
    mqtt_publish(api.gw.port, "plant/boiler/temp", b"88", retain=True)
    s = Sse(api.http_port, "plant/#", api.tokens["main"])
    streams.append(s)
    assert s.status == 200
    assert s.content_type.startswith("text/event-stream")
    s.ready()
    event, data = s.next_event()
    assert event == "message"
    assert data == {
        "topic": "plant/boiler/temp", "payload": "88", "encoding": "utf-8", "qos": 1,
        "retain": True, "content_type": None,
    }
    mqtt_publish(api.gw.port, "plant/boiler/state", b"\xff\x00on")
    event, data = s.next_event()
    assert event == "message"
    assert data["topic"] == "plant/boiler/state"
    assert data["retain"] is False
    assert data["encoding"] == "base64"
    assert base64.b64decode(data["payload"]) == b"\xff\x00on"
    mqtt_publish(api.gw.port, "elsewhere/x", b"no")  # not matching: not on the stream
    status, _, _ = api.publish(
        api.tokens["main"], topic="plant/http", payload="via http", content_type="text/plain"
    )
    assert status == 200
    event, data = s.next_event()
    assert (data["topic"], data["payload"], data["content_type"]) == (
        "plant/http", "via http", "text/plain"
    )
    assert api.health()["http_streams"] == 1


def test_sse_disconnect_ends_the_session(api: HttpGateway) -> None:
    s = Sse(api.http_port, "gone/#", api.tokens["main"])
    try:
        s.ready()
        assert api.health()["http_streams"] == 1
    finally:
        s.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and api.health()["http_streams"] != 0:
        time.sleep(0.05)
    body = api.health()
    assert body["http_streams"] == 0
    assert body["sessions"] == 0  # the LocalClient session ended with the stream


def test_slow_sse_reader_never_blocks_the_broker(
    gateway_factory: GatewayFactory, tmp_path: Path, streams: list[Sse],
) -> None:
    # the MQTT subscriber's session may queue the whole burst: on a loaded machine paho
    # falls behind, and the default max_queued_messages (1000) would drop by design
    api = start_http_gateway(gateway_factory, tmp_path, {"main": "alice"},
                             extra={"mqtt": {"max_queued_messages": 10000}})
    s = Sse(api.http_port, "bulk/#", api.tokens["main"])
    streams.append(s)
    s.ready()
    sub = MqttSub(api.gw.port, "bulk/#")  # a normal subscriber that keeps up
    n, payload = 3000, b"x" * 10_000  # ~30 MB: more than the stream buffer plus socket buffers
    c = mqtt.Client(V2, client_id="bulk-pub", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.connect(LOOPBACK, api.gw.port)
    c.loop_start()
    try:
        infos = [c.publish(f"bulk/{i}", payload, qos=1) for i in range(n)]
        deadline = time.monotonic() + 60  # generous: 30 MB on a loaded 2-core CI machine
        for info in infos:  # every PUBACK arrives although the SSE reader reads nothing
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        acked = sum(i.is_published() for i in infos)
        assert acked == n, f"only {acked} of {n} PUBACKs while the SSE reader stalled"
    finally:
        c.disconnect()
        c.loop_stop()
    try:
        got = len(sub.wait_for(n, timeout=40))
        assert got == n, f"the MQTT subscriber got {got} of {n}"
    finally:
        sub.close()
    deadline = time.monotonic() + 40
    seen, dropped = 0, 0
    while time.monotonic() < deadline and not dropped:
        event, data = s.next_event(timeout=max(0.1, deadline - time.monotonic()))
        if event == "dropped":
            dropped = data["dropped"]
        else:
            seen += 1
    assert dropped > 0, f"no dropped event after {seen} events"
    assert seen + dropped <= n


def test_missing_or_bad_token_401(api: HttpGateway) -> None:
    for token in (None, "", "rmq_not-a-real-token", api.tokens["main"] + "x"):
        status, headers, body = api.publish(token, topic="a", payload="b")
        assert status == 401, (token, body)
        assert body["ok"] is False and body["error"]
        assert headers["www-authenticate"].startswith("Bearer")
    status, _, _ = api.request(
        "POST", f"{API}/publish", {"topic": "a", "payload": "b"},
        headers={"Authorization": "Basic " + base64.b64encode(b"u:p").decode()},
    )
    assert status == 401
    status, _, body = api.request("GET", f"{API}/subscribe?filter=%23")
    assert status == 401, body
    status, _, body = api.request("GET", f"{API}/subscribe?filter=%23", token="nope")
    assert status == 401, body


def test_acl_403(gateway_factory: GatewayFactory, tmp_path: Path, streams: list[Sse]) -> None:
    acl = {
        "auth": {"allow_anonymous": True, "acl_default": "deny"},
        "acl": [
            {"user": "alice", "topic": "alice/#", "access": "allow"},
            {"user": "*", "topic": "public/#", "action": "subscribe", "access": "allow"},
        ],
    }
    api = start_http_gateway(gateway_factory, tmp_path, {"a": "alice", "b": "bob"}, acl)
    status, _, body = api.publish(api.tokens["a"], topic="alice/x", payload="ok")
    assert status == 200, body
    for token, topic in (("a", "bob/x"), ("b", "alice/x"), ("b", "public/x"), ("a", "$SYS/x")):
        status, _, body = api.publish(api.tokens[token], topic=topic, payload="no")
        assert status == 403, (token, topic, body)
        assert "not authorised" in body["error"]
    status, _, body = api.request("GET", f"{API}/subscribe?filter=bob/%23", token=api.tokens["a"])
    assert status == 403, body
    status, _, body = api.request("GET", f"{API}/subscribe?filter=%23", token=api.tokens["b"])
    assert status == 403, body
    s = Sse(api.http_port, "public/#", api.tokens["b"])
    streams.append(s)
    assert s.status == 200
    s.ready()
    # a device retrying a refused publish: every refusal answered, one log line (with a count
    # once a minute), not one per attempt
    for _ in range(20):
        status, _, body = api.publish(api.tokens["a"], topic="bob/y", payload="no")
        assert status == 403, body
    lines = [ln for ln in api.gw.log().splitlines()
             if "http token" in ln and "not authorised to publish" in ln]
    assert len(lines) == 2, lines  # tokens a and b once each (22 refusals from a)


BAD_PUBLISH: list[tuple[Any, str]] = [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "invalid JSON"),
    ({"payload": "x"}, "topic"),
    ({"topic": 5, "payload": "x"}, "topic"),
    ({"topic": "", "payload": "x"}, "topic"),
    ({"topic": "a/+", "payload": "x"}, "topic"),
    ({"topic": "a/#", "payload": "x"}, "topic"),
    ({"topic": "a"}, "payload"),
    ({"topic": "a", "payload": 1}, "payload"),
    ({"topic": "a", "payload": "!!", "encoding": "base64"}, "base64"),
    ({"topic": "a", "payload": "x", "encoding": "latin-1"}, "encoding"),
    ({"topic": "a", "payload": "x", "qos": 2}, "qos"),
    ({"topic": "a", "payload": "x", "qos": True}, "qos"),
    ({"topic": "a", "payload": "x", "retain": "yes"}, "retain"),
    ({"topic": "a", "payload": "x", "content_type": 7}, "content_type"),
    ({"topic": "a", "payload": "x", "user_properties": {"k": 1}}, "user_properties"),
    ({"topic": "a", "payload": "x", "user_properties": ["k"]}, "user_properties"),
    ({"topic": "a", "payload": "x", "colour": "red"}, "unknown field"),
]


def test_bad_publish_400(api: HttpGateway) -> None:
    for body, fragment in BAD_PUBLISH:
        status, _, resp = api.request("POST", f"{API}/publish", body, api.tokens["main"])
        assert status == 400, (body, resp)
        assert resp["ok"] is False
        assert fragment in resp["error"], (body, resp)


def test_bad_subscribe_400(api: HttpGateway) -> None:
    token = api.tokens["main"]
    for query in ("", "?filter=", "?filter=a/%23/b", "?filter=a%2Bb", "?filter=a&filter=b"):
        status, _, body = api.request("GET", f"{API}/subscribe{query}", token=token)
        assert status == 400, (query, body)
        assert "filter" in body["error"]


def test_unknown_route_and_method_are_json(api: HttpGateway) -> None:
    status, _, body = api.request("GET", f"{API}/nothing")
    assert status == 404 and body["ok"] is False
    status, headers, body = api.request("GET", f"{API}/publish", token=api.tokens["main"])
    assert status == 405 and body["ok"] is False
    assert "POST" in headers["allow"]


def test_body_too_large_413(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    api = start_http_gateway(gateway_factory, tmp_path, {"t": "u"}, http={"max_body": 1024})
    token = api.tokens["t"]
    status, _, body = api.publish(token, topic="big", payload="x" * 900)
    assert status == 200, body
    status, _, body = api.publish(token, topic="big", payload="x" * 2000)
    assert status == 413, body
    assert "1024" in body["error"]
    # chunked (no Content-Length): refused while reading
    conn = http.client.HTTPConnection(LOOPBACK, api.http_port, timeout=10)
    try:
        chunk = json.dumps({"topic": "big", "payload": "y" * 3000}).encode()
        conn.request(
            "POST", f"{API}/publish", body=iter([chunk[:1000], chunk[1000:]]),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413
        resp.read()
    finally:
        conn.close()
    status, _, _ = api.publish(None, topic="big", payload="x" * 2000)
    assert status == 401  # authentication is checked before the body is read


def test_queue_full_503_and_health_forwarding(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    down = free_port()  # nothing listens there: the upstream stays down
    cfg = {
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{down}"], "keep_alive": 5}],
        "forward": [{"filter": "alarm/#", "upstream": "cloud", "qos": 1, "priority": "alarm"}],
        "queue": {"commit_delay_ms": 2.0, "alarm": {"max_messages": 1}},
    }
    api = start_http_gateway(gateway_factory, tmp_path, {"t": "u"}, cfg)
    token = api.tokens["t"]
    status, _, body = api.publish(token, topic="alarm/fire", payload="1")
    assert status == 200, body
    status, headers, body = api.publish(token, topic="alarm/fire", payload="2")
    assert status == 503, body
    assert int(headers["retry-after"]) > 0
    assert body["ok"] is False and "refused" in body["error"]
    status, _, body = api.publish(token, topic="other/x", payload="3")  # not forwarded
    assert status == 200, body
    health = api.health()
    fwd = health["forwarding"]
    assert fwd is not None
    assert fwd["upstreams"]["cloud"]["connected"] is False
    assert fwd["upstreams"]["cloud"]["queued"] == 1
    assert fwd["queued"] == 1
    assert fwd["refused"] >= 1
    assert health["status"] == "degraded"


def test_token_cli_and_live_reload(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    api = start_http_gateway(gateway_factory, tmp_path, {"first": "u1"})
    tokens_file = Path(api.gw.config["http"]["tokens_file"])

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    code, out, err = run("token", "add", "second", "--user", "u2",
                         "--tokens-file", str(tokens_file))
    assert code == 0, err
    token = out.strip()
    assert token.startswith("rmq_") and len(token) > 40
    assert "only this once" in err
    assert token not in tokens_file.read_text()  # only the hash is stored
    assert stat.S_IMODE(os.stat(tokens_file).st_mode) == 0o600
    code, _, err = run("token", "add", "second", "--tokens-file", str(tokens_file))
    assert code == 2 and "already exists" in err
    code, out, _ = run("token", "list", "--config", str(api.gw.config_path))
    assert code == 0
    assert [line.split("\t")[:2] for line in out.splitlines()] == [
        ["first", "u1"], ["second", "u2"],
    ]

    def status_with(tok: str) -> int:
        return api.publish(tok, topic="reload/x", payload="1")[0]

    deadline = time.monotonic() + 10  # the gateway re-reads the file (at most once a second)
    while time.monotonic() < deadline and status_with(token) != 200:
        time.sleep(0.2)
    assert status_with(token) == 200
    code, out, _ = run("token", "remove", "second", "--tokens-file", str(tokens_file))
    assert code == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and status_with(token) != 401:
        time.sleep(0.2)
    assert status_with(token) == 401
    assert status_with(api.tokens["first"]) == 200
    code, _, err = run("token", "remove", "second", "--tokens-file", str(tokens_file))
    assert code == 1 and "no such token" in err


# --------------------------------------------------------------------------- unit level


def test_tokens_file_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "tokens.toml"
    t1 = add_token(path, "one", "alice")
    t2 = add_token(path, "two", "bob")
    db = TokenDB.load(path)
    assert db.names() == ["one", "two"]
    entry = db.lookup(t1)
    assert entry is not None and (entry.name, entry.user) == ("one", "alice")
    entry = db.lookup(t2)
    assert entry is not None and entry.user == "bob"
    assert db.lookup("") is None and db.lookup(t1[:-1]) is None and db.lookup("x" * 10000) is None
    assert hash_token(t1) in path.read_text()
    assert remove_token(path, "one") and not remove_token(path, "one")
    assert TokenDB.load(path).lookup(t1) is None
    with pytest.raises(ValueError):
        add_token(path, "bad name", "alice")
    with pytest.raises(ValueError):
        add_token(path, "two", "carol")
    t3 = add_token(path, "two", "carol", replace=True)
    assert TokenDB.load(path).lookup(t2) is None
    assert TokenDB.load(path).lookup(t3) is not None
    bad = tmp_path / "bad.toml"
    for text, fragment in (
        ("[tokens.a]\nuser = 'x'\nhash = 'md5:00'\n", "hash"),
        ("[tokens.a]\nhash = 'sha256:" + "0" * 64 + "'\n", "user"),
        ("[tokens.a]\nuser = 'x'\nhash = 'sha256:" + "0" * 64 + "'\nextra = 1\n", "extra"),
        ("[other]\n", "unknown key"),
        ("not toml [", "invalid TOML"),
    ):
        bad.write_text(text)
        with pytest.raises(TokensFileError, match=fragment):
            TokenDB.load(bad)
    with pytest.raises(TokensFileError, match="not found"):
        TokenDB.load(tmp_path / "missing.toml")


def test_slow_stream_drops_instead_of_blocking() -> None:
    s = http_api._Stream()
    n = http_api.STREAM_MAX_MESSAGES + 25
    for i in range(n):
        s.push(Message(f"t/{i}", b"x"), False)
    assert len(s.buffer) == http_api.STREAM_MAX_MESSAGES
    assert s.dropped == 25
    assert len(s.take()) == http_api.STREAM_MAX_MESSAGES
    s.push(Message("t/again", b"\x00\xff", 1, False, {"content_type": "a/b"}), True)
    ev = s.take()[0].decode()
    assert ev.startswith("event: message\ndata: ") and ev.endswith("\n\n")
    data = json.loads(ev.split("data: ", 1)[1])
    assert data == {"topic": "t/again", "payload": "AP8=", "encoding": "base64", "qos": 1,
                    "retain": True, "content_type": "a/b"}


def test_openapi_document_parses() -> None:
    import yaml
    from openapi_spec_validator import validate

    doc = yaml.safe_load((Path(__file__).parent.parent / "docs" / "http-api.yaml").read_text())
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/api/v1/publish", "/api/v1/subscribe", "/api/v1/health",
                                 "/api/v1/incidents/{incident}", "/api/v1/erase"}
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema


def test_https_listener_serves_only_verified_tls(
    gateway_factory: GatewayFactory, tmp_path: Path,
) -> None:
    """``https://`` listeners use ``[http.tls]``: a client trusting the CA publishes with its
    token; plain HTTP on that port and clients that do not trust the certificate fail."""
    import ssl

    from .test_uplink import _make_ca_and_server_cert

    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    tokens_file = tmp_path / "tokens.toml"
    token = add_token(tokens_file, "main", "main")
    port = free_port()
    gw = gateway_factory(config={"http": {
        "listen": [f"https://{LOOPBACK}:{port}"], "tokens_file": str(tokens_file),
        "tls": {"cert": str(cert), "key": str(key)},
    }})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    else:
        raise AssertionError(f"HTTPS API did not start:\n{gw.log()}")
    sub = MqttSub(gw.port, "secure/#")
    try:
        trusted = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection(LOOPBACK, port, context=trusted, timeout=10)
        conn.request("POST", f"{API}/publish", body=json.dumps({"topic": "secure/a",
                     "payload": "over tls"}), headers={"Authorization": f"Bearer {token}",
                                                       "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        conn.close()
        got = sub.wait_for(1)
        assert [(m.topic, m.payload) for m in got] == [("secure/a", b"over tls")]
    finally:
        sub.close()
    untrusted = http.client.HTTPSConnection(LOOPBACK, port, timeout=10,
                                            context=ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted.request("GET", f"{API}/health")
    untrusted.close()
    plain = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    with pytest.raises(ConnectionError):  # the TLS server drops a cleartext request
        plain.request("GET", f"{API}/health")
        plain.getresponse()
    plain.close()
    assert gw.proc is not None and gw.proc.poll() is None, "gateway keeps serving"


def test_https_listener_needs_the_tls_table(tmp_path: Path) -> None:
    from rapidmq_edge.config import ConfigError, load_config

    f = tmp_path / "gateway.toml"
    f.write_text('[http]\nlisten = ["https://127.0.0.1:8443"]\n')
    with pytest.raises(ConfigError, match=r"http\.tls: required because http\.listen\[0\]"):
        load_config(f)
    f.write_text('[http]\nlisten = ["https://127.0.0.1:8443"]\n[http.tls]\n'
                 'cert = "missing.crt"\nkey = "missing.key"\n')
    with pytest.raises(ConfigError, match=r"http\.tls\.cert: file not found"):
        load_config(f)
