"""Fuzz the HTTP API's request handling (:mod:`rapidmq_edge.ingress.http`) end to end in
process: the bytes of a request go into aiohttp's HTTP protocol over an in-memory
transport, through the routing, the middleware and the handlers, to a real broker.

Input: one mode byte (``byte % 4``), then:

* mode 0: raw bytes, as a client would send them on a connection;
* mode 1: ``POST /api/v1/publish``: an authorization byte, then the body (JSON);
* mode 2: ``GET /api/v1/subscribe?<query>``: an authorization byte, then the query string
  (bytes outside printable ASCII are percent-encoded);
* mode 3: an authorization byte, a (method, path) byte, then the body.

Invariants:

* every status sent is below 500 (2xx or 4xx): no handler raises, nothing answers 500;
* a well-formed request (modes 1-3) gets exactly one response (an event stream counts);
* every message the API hands to the broker is a valid MQTT application message: a topic
  name, QoS 0 or 1 as an int, and properties that encode as MQTT 5 and decode unchanged.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import hashlib
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError

    from rapidmq_edge.broker.broker import Broker, BrokerLimits
    from rapidmq_edge.broker.message import Message
    from rapidmq_edge.config.ingress import HttpSettings
    from rapidmq_edge.ingress.http import HttpApi
    from rapidmq_edge.mqtt.codec import PacketReader, encode
    from rapidmq_edge.mqtt.packets import MQTT_5, Publish
    from rapidmq_edge.mqtt.topics import valid_topic_name

__all__ = ["TOKEN", "check", "main"]

TARGET = "http_api"
#: the bearer token the harness's tokens file accepts (user "fuzzer")
TOKEN = "rmq_fuzz-token-0123456789"
MAX_BODY = 256 * 1024
_AUTH = (
    f"Bearer {TOKEN}", "Bearer rmq_wrong", None, "Basic Zm9vOmJhcg==", "Bearer ",
    f"bearer  {TOKEN} ", f"Bearer {TOKEN}x", "Bearer " + "x" * 600,
)
_ROUTES = (
    ("GET", "/api/v1/health"), ("POST", "/api/v1/health"), ("GET", "/api/v1/publish"),
    ("PUT", "/api/v1/publish"), ("GET", "/nope"), ("HEAD", "/api/v1/health"),
    ("OPTIONS", "/api/v1/subscribe"), ("POST", "/api/v1/publish"),
    ("DELETE", "/api/v1/subscribe"), ("GET", "/api/v1/subscribe"),
)
_STATUS = re.compile(rb"(?:^|\r\n)HTTP/1\.[01] (\d{3}) ")
_SPIN = 200


class _Access:
    """Everything is allowed but topics and filters under ``deny``."""

    def can_publish(self, username: str | None, client_id: str, topic: str,
                    qos: int | None = None, retain: bool | None = None) -> bool:
        return not topic.startswith("deny")

    def can_subscribe(self, username: str | None, client_id: str, filt: str,
                      qos: int | None = None) -> bool:
        return not filt.startswith("deny")

    def accept_identity(self, client_id: str, username: str | None,
                        cert_cn: str | None) -> str | None:
        return None  # no tenant: topics as named


class _Transport(asyncio.Transport):
    """Collects what the server writes; closing is remembered, nothing is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.out += line

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 40000)
        return default


class _Errors(logging.Handler):
    """Records the exceptions aiohttp logs, but for its own HTTP parser's (a malformed
    request, answered 400): a handler that raised, an exception nobody retrieved."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            self.records.append(record)


class _Fixture:
    """One event loop, broker, API and aiohttp server for every input."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="fuzz-http-"))
        atexit.register(shutil.rmtree, self.folder, True)
        tokens = self.folder / "tokens.toml"
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        tokens.write_text(f'[tokens.fuzz]\nuser = "fuzzer"\nhash = "sha256:{digest}"\n')
        self.violations: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.broker = Broker(BrokerLimits(max_qos=1), taps=[self._tap])
        settings = HttpSettings(tokens_file=tokens, max_body=MAX_BODY)
        self.api = HttpApi(self.broker, _Access(), settings,  # type: ignore[arg-type]
                           lambda: {"gateway": "fuzz", "forwarding": None})
        self.runner = web.AppRunner(self.api.make_app(), handler_cancellation=True,
                                    access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        server = self.runner.server
        assert server is not None
        self.server = server
        self.errors = _Errors()
        for name in ("aiohttp.server", "aiohttp.web", "asyncio"):
            logging.getLogger(name).addHandler(self.errors)
        logging.getLogger("rapidmq_edge").setLevel(logging.CRITICAL)

    def _tap(self, msg: Message) -> None:
        problem = _invalid_message(msg)
        if problem:
            self.violations.append(problem)

    async def _exchange(self, raw: bytes) -> bytes:
        proto = self.server()
        transport = _Transport()
        proto.connection_made(transport)
        proto.data_received(raw)
        size, idle = 0, 0
        for _ in range(_SPIN):
            await asyncio.sleep(0)
            if len(transport.out) == size:
                idle += 1
                if idle > 20:
                    break
            else:
                size, idle = len(transport.out), 0
        proto.connection_lost(None)
        for _ in range(20):
            await asyncio.sleep(0)
        return bytes(transport.out)

    def exchange(self, raw: bytes) -> bytes:
        """Send ``raw`` on a fresh connection; everything the server wrote back."""
        self.broker.retained.clear()
        self.errors.records.clear()
        self.violations.clear()
        return self.loop.run_until_complete(self._exchange(raw))


def _invalid_message(msg: Message) -> str | None:
    """Why ``msg`` is not a valid MQTT application message (None when it is)."""
    if not isinstance(msg.topic, str) or not valid_topic_name(msg.topic):
        return f"invalid topic {msg.topic!r}"
    if type(msg.qos) is not int or msg.qos not in (0, 1):
        return f"invalid QoS {msg.qos!r}"
    if type(msg.retain) is not bool or not isinstance(msg.payload, bytes):
        return f"invalid retain {msg.retain!r} or payload type"
    packet = Publish(msg.topic, msg.payload, msg.qos, msg.retain, False, 1 if msg.qos else 0,
                     dict(msg.properties))
    try:
        wire = encode(packet, MQTT_5)
        reader = PacketReader(version=MQTT_5)
        got = reader.feed(wire)
    except Exception as exc:  # struct.error, UnicodeEncodeError, TypeError, MqttError...
        return f"message {packet!r} does not encode as MQTT 5: {exc!r}"
    if got != [packet]:
        return f"message {packet!r} came back as {got!r}"
    return None


@functools.cache
def fixture() -> _Fixture:
    """The shared fixture (built on first use)."""
    return _Fixture()


def _quote(query: bytes) -> bytes:
    return b"".join(bytes((b,)) if 0x21 <= b <= 0x7E else b"%%%02X" % b for b in query)


def _request(method: str, target: bytes, auth: str | None, body: bytes | None) -> bytes:
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: fuzz"]
    if auth is not None:
        head.append(b"Authorization: " + auth.encode())
    if body is not None:
        head += [b"Content-Type: application/json", b"Content-Length: %d" % len(body)]
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")


def build_request(data: bytes) -> tuple[bytes, bool]:
    """The bytes to send for a fuzz input, and whether they form one well-formed request."""
    mode = data[0] % 4
    if mode == 0:
        return data[1:], False
    auth = _AUTH[data[1] % len(_AUTH)] if len(data) > 1 else None
    rest = data[2:]
    if mode == 1:
        return _request("POST", b"/api/v1/publish", auth, rest), True
    if mode == 2:
        return _request("GET", b"/api/v1/subscribe?" + _quote(rest), auth, None), True
    method, path = _ROUTES[rest[0] % len(_ROUTES)] if rest else _ROUTES[0]
    body = rest[1:] if method in ("POST", "PUT", "DELETE") else None
    return _request(method, path.encode(), auth, body), True


def check(data: bytes) -> None:
    """Raise (AssertionError) when an invariant breaks."""
    if not data:
        return
    raw, well_formed = build_request(data)
    fx = fixture()
    out = fx.exchange(raw)
    if fx.errors.records:
        rec = fx.errors.records[0]
        detail = logging.Formatter().format(rec)
        raise AssertionError(f"the server logged an error for {raw[:300]!r}:\n{detail}")
    assert not fx.violations, f"invalid message published: {fx.violations[0]}"
    statuses = [int(m) for m in _STATUS.findall(out)]
    bad = [s for s in statuses if s >= 500]
    assert not bad, f"status {bad[0]} for {raw[:300]!r}:\n{out[:500]!r}"
    if well_formed:
        assert out.startswith(b"HTTP/1.1 "), f"no response to {raw[:300]!r}: {out[:200]!r}"
        assert len(statuses) == 1, f"{len(statuses)} responses to one request: {out[:500]!r}"


def main() -> None:
    """Run under atheris: ``python -m fuzz.http_api [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
