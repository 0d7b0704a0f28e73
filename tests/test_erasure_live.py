"""Erasure while the gateway runs (issue 18 part 4): ``rapidmq-edge erase`` against a
running gateway goes through ``POST /api/v1/erase`` (admin tokens only). The connected
device is disconnected and its Will is not sent; afterwards no file in the data directory
(WAL files included) holds its marker payload or its id, while another client keeps
publishing through the whole erasure (every message acknowledged, the longest wait
measured) and another device's retained and queued data stays. The forward queue records
publishers: the device's message on a topic without its id is erased, another device's on
the same kind of topic is not."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidmq_edge.crypto.keystore import KeyStore
from rapidmq_edge.gateway.erasure_live import ErasureGate
from rapidmq_edge.mqtt import reasons as rc
from rapidmq_edge.security.tokens import add_token
from tests.conftest import free_port
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, wait_until

DEVICE = "dev-live-4c2d"
MARKER = b"MARKER-LIVE-9e07-private"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def _post(url: str, token: str | None, body: Any) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and needle in p.read_bytes()]


class _Steady(threading.Thread):
    """Another client publishing QoS 1 all along (forwarded and queued for an offline
    persistent subscriber: each PUBACK waits for both stores' commits); the longest
    PUBACK wait (s)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = PahoClient(port, "steady")
        self.stop = threading.Event()
        self.sent = 0
        self.longest = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                self.client.publish("sensors/steady", b"S%d" % self.sent, qos=1, timeout=10)
                self.longest = max(self.longest, time.perf_counter() - t)
                self.sent += 1
                time.sleep(0.005)
        except BaseException as exc:  # a PUBACK that never came: the test says so
            self.error = exc


def test_erase_while_running(tmp_path: Path,
                             gateway_factory: Callable[..., GatewayProcess]) -> None:
    tokens = tmp_path / "tokens.toml"
    admin = add_token(tokens, "ops", "ops")
    viewer = add_token(tokens, "viewer", "viewer", role="read")
    own = add_token(tokens, "dev-token", "dev", role="read")  # the device's: erased on request
    http_port = free_port()
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{free_port()}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "persistence": {"durability": "fsync"},
        "http": {"listen": [f"http://127.0.0.1:{http_port}"], "tokens_file": str(tokens)},
        "retention": [{"filter": "sensors/#", "retention_s": 3600}],  # its index forgets too
        # its detector streams are forgotten too
        "intelligence": {"enabled": True, "priority": "rules", "health": False,
                         "threat": "off"},
    })
    KeyStore(gw.data_dir / "keys").create_identity()
    api = f"http://127.0.0.1:{http_port}/api/v1/erase"

    def unauthorised() -> bool:
        try:
            return _post(api, None, {})[0] == 401
        except OSError:  # not listening yet
            return False

    assert wait_until(unauthorised, timeout=10)

    keeper = PahoClient(gw.port, "keeper", clean_session=False)  # offline: messages wait
    assert keeper.subscribe("sensors/#", qos=1) == [1]
    keeper.disconnect()
    watcher = PahoClient(gw.port, "watcher")
    watcher.subscribe("sensors/steady", qos=1)
    watcher.subscribe("status/#", qos=1)
    dev = PahoClient(gw.port, DEVICE, clean_session=False,
                     will=(f"status/{DEVICE}", MARKER + b"-will", 1, True))
    assert dev.subscribe(f"cmd/{DEVICE}", qos=1) == [1]
    dev.publish(f"sensors/{DEVICE}/temp", MARKER, qos=1, retain=True)
    for i in range(3):
        dev.publish(f"sensors/{DEVICE}/temp", MARKER + b"-%d" % i, qos=1)
    dev.publish("sensors/room1/temp", MARKER + b"-room", qos=1)  # its id is no level here
    for v in (b'{"value": 21.5}', b'{"value": 21.7}'):  # readings: a detector stream
        dev.publish(f"sensors/{DEVICE}/reading", v, qos=1)
    other = PahoClient(gw.port, "dev-other")
    other.publish("sensors/dev-other/temp", b"OTHER-KEEP", qos=1, retain=True)
    other.publish("sensors/room1/hum", b"OTHER-ROOM", qos=1)
    other.disconnect()
    data = gw.data_dir
    assert wait_until(lambda: bool(_files_holding(data, MARKER)), timeout=5)

    # refused: no token, a read-only token, an unknown id (no receipt), a bad body
    assert _post(api, viewer, {"device": DEVICE})[0] == 403
    status, doc = _post(api, admin, {"device": "nobody-here"})
    assert status == 404 and "unknown device" in doc["error"]
    assert _post(api, admin, {"device": DEVICE, "queue": "shred"})[0] == 400
    assert not (data / "audit" / "erasures.jsonl").exists()
    no_token = _cli("erase", "--config", str(gw.config_path), "--device", DEVICE,
                    env={"RAPIDMQ_EDGE_TOKEN": ""})
    assert no_token.returncode == 1 and "RAPIDMQ_EDGE_TOKEN" in no_token.stderr

    steady = _Steady(gw.port)
    steady.start()
    try:
        time.sleep(0.3)
        r = _cli("erase", "--config", str(gw.config_path), "--device", DEVICE,
                 "--token", "dev-token", env={"RAPIDMQ_EDGE_TOKEN": admin})
        time.sleep(0.3)
    finally:
        steady.stop.set()
        steady.join(10)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    erased = report["erased"]
    assert erased["broker:sessions"] == 1 and erased["broker:subscriptions"] == 1
    assert erased["broker:retained"] == 1 and erased["broker:deliveries"] >= 5
    assert erased["forward:messages"] == 7  # room1 included: by publisher, not by topic
    assert erased["intelligence:streams"] >= 1, report
    assert set(report["pause_ms"]) == {"loop", "broker", "forward"}
    assert "token dev-token" in report["removed"]
    # the removed token no longer opens the API (the tokens file is reloaded)
    assert wait_until(lambda: _post(api, own, {"device": DEVICE})[0] == 401, timeout=5)
    print("erasure pauses (ms):", report["pause_ms"], "longest PUBACK wait of another "
          f"client: {steady.longest * 1000:.1f} ms over {steady.sent} publishes")

    # the device was disconnected, its Will not sent; the other client was served all along
    assert dev.disconnected.wait(5)
    dev.disconnect()
    assert steady.error is None and steady.sent > 5 and steady.longest < 5.0, vars(steady)
    got: list[Any] = []

    def all_delivered() -> bool:
        got.extend(watcher.drain())
        return len([m for m in got if m.topic == "sensors/steady"]) >= steady.sent

    assert wait_until(all_delivered, timeout=5), (len(got), steady.sent)
    got.extend(watcher.drain(0.2))
    assert not [m for m in got if m.topic.startswith("status/")]  # no Will
    assert len([m for m in got if m.topic == "sensors/steady"]) == steady.sent

    # nothing left on disk (WAL included), while the gateway runs
    assert _files_holding(data, MARKER) == []
    assert _files_holding(data, DEVICE.encode()) == []
    receipt = json.loads((data / "audit" / "erasures.jsonl").read_bytes().splitlines()[-1])
    assert receipt["device_sha256"] == hashlib.sha256(DEVICE.encode()).hexdigest()
    assert receipt["alg"] == "ML-DSA-65"

    # the other device's data stays: retained served, queued for the upstream
    late = PahoClient(gw.port, "late")
    late.subscribe("sensors/+/temp", qos=1)
    assert [m.payload for m in late.get_n(1, 5)] + [m.payload for m in late.drain(0.4)] == [
        b"OTHER-KEEP"]
    late.disconnect()
    watcher.disconnect()
    gw.stop()
    db = sqlite3.connect(data / "forward.db")
    rows = db.execute("SELECT payload, origin FROM messages WHERE origin IS NOT 'steady' "
                      "AND topic NOT LIKE '%erasure'").fetchall()
    request = db.execute("SELECT payload FROM messages WHERE topic LIKE '%erasure'").fetchall()
    db.close()
    assert sorted(rows) == [(b"OTHER-KEEP", "dev-other"), (b"OTHER-ROOM", "dev-other")]
    assert len(request) == 1 and json.loads(request[0][0])["device_sha256"] == \
        receipt["device_sha256"]


def test_the_gate_refuses_an_id_being_erased() -> None:
    gate = ErasureGate()
    gate.erasing.add("dev-1")
    assert gate.admit("dev-1") == rc.SERVER_BUSY and gate.admit("dev-2") == 0


def test_a_forward_queue_from_before_publishers_is_migrated(tmp_path: Path) -> None:
    """A queue written before rows kept their publisher opens with origin NULL (its rows
    still sent; an erasure matches them by topic level), and new rows record it."""
    import asyncio

    from rapidmq_edge.store.forward_queue import ForwardQueue

    path = tmp_path / "forward.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, upstream TEXT NOT NULL,
            priority INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
            qos INTEGER NOT NULL, props BLOB NOT NULL, created REAL NOT NULL,
            expires_at REAL, size INTEGER NOT NULL);
        CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
        INSERT INTO messages (upstream, priority, topic, payload, qos, props, created, size)
            VALUES ('cloud', 2, 'sensors/dev1/t', x'01', 1, x'', 1.0, 15),
                   ('cloud', 2, 'sensors/dev2/t', x'02', 1, x'', 1.0, 15);
    """)
    db.commit()
    db.close()

    async def run() -> tuple[list[bytes], int, list[tuple[Any, ...]]]:
        q = ForwardQueue(path, durability="normal")
        try:
            q.put("cloud", 2, "plain/topic", b"\x03", origin="dev1")
            fut = q.commit_future()
            assert fut is not None
            await fut
            erased = await q.erase_origin("dev1")  # its new row and its old one by level
            left = [m.payload for m in q.fetch("cloud", 10)]
        finally:
            await q.close()
        db = sqlite3.connect(path)
        rows = db.execute("SELECT payload, origin FROM messages ORDER BY id").fetchall()
        db.close()
        return left, erased, rows

    left, erased, rows = asyncio.run(run())
    assert erased == 2 and left == [b"\x02"]
    assert rows == [(b"\x02", None)]


def test_a_large_store_is_scrubbed_without_vacuum(tmp_path: Path) -> None:
    """Above the VACUUM bound a running store's erasure only deletes with secure_delete
    and empties the WAL: the marker (in rows and in an overflow page) is gone from every
    file all the same, the other rows stay and the queue keeps working."""
    import asyncio

    from rapidmq_edge.store.erase import scrub_live
    from rapidmq_edge.store.forward_queue import ORIGIN_WHERE, ForwardQueue

    path = tmp_path / "forward.db"

    async def run() -> tuple[bool, int, list[int]]:
        q = ForwardQueue(path, durability="normal")
        try:
            for i in range(2000):
                mine = i % 100 == 7
                q.put("cloud", 2, f"s/{i % 50}", MARKER if mine else b"p" * 100,
                      origin=DEVICE if mine else "other")
            q.put("cloud", 2, "s/big", MARKER * 500, origin=DEVICE)  # overflow pages
            fut = q.commit_future()
            assert fut is not None
            await fut
            assert _files_holding(tmp_path, MARKER)
            erased = await q.erase_origin(DEVICE)
            done = await scrub_live(q, path, [("DELETE FROM messages WHERE " + ORIGIN_WHERE,
                                               (DEVICE, f"/{DEVICE}/"))], 0)
            q.put("cloud", 2, "s/after", b"after", origin="other")  # still writing
            fut = q.commit_future()
            assert fut is not None
            await fut
            left = len(q.fetch("cloud", 5000))
            return done.vacuumed, erased, [done.counts[0], left]
        finally:
            await q.close()

    vacuumed, erased, (deleted, left) = asyncio.run(run())
    assert not vacuumed and erased == 21 and deleted == 21 and left == 1981
    assert _files_holding(tmp_path, MARKER) == []
    assert _files_holding(tmp_path, DEVICE.encode()) == []
