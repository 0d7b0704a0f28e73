"""Erasure (issue 18 part 4): ``rapidmq-edge erase --device ID`` on a real gateway's data
directory. The device publishes a retained marker, messages queued for an offline
persistent subscriber and for an unreachable upstream, and holds a persistent session of
its own; after the erasure no file in the data directory (WAL files included) holds the
marker or the id, a restarted gateway serves none of it, other devices' data stays, a
receipt is chained and ML-DSA signed, and the request to the upstream is queued."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rapidmq_edge.crypto.keystore import KeyStore
from tests.conftest import free_port
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient

DEVICE = "dev-erase-7f3a"
MARKER = b"MARKER-5b1e9c-private-reading"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=60)


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and needle in p.read_bytes()]


def test_erase_device(tmp_path: Path, gateway_factory: Callable[..., GatewayProcess]) -> None:
    dead = free_port()  # an upstream that never answers: forwarded messages stay queued
    gw = gateway_factory({
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{dead}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "qos": 1}],
        "persistence": {"durability": "fsync"},
    })
    KeyStore(gw.data_dir / "keys").create_identity()  # the receipt's signing key
    # an offline persistent subscriber: the device's messages wait in its session
    sub = PahoClient(gw.port, "keeper", clean_session=False)
    assert sub.subscribe("sensors/#", qos=1) == [1]
    sub.disconnect()
    dev = PahoClient(gw.port, DEVICE, clean_session=False)
    assert dev.subscribe(f"cmd/{DEVICE}", qos=1) == [1]
    dev.publish(f"sensors/{DEVICE}/temp", MARKER, qos=1, retain=True)
    for i in range(3):
        dev.publish(f"sensors/{DEVICE}/temp", MARKER + b"-%d" % i, qos=1)
    dev.disconnect()
    other = PahoClient(gw.port, "dev-other")
    other.publish("sensors/dev-other/temp", b"OTHER-KEEP", qos=1, retain=True)
    other.disconnect()
    gw.stop()
    data = gw.data_dir
    assert _files_holding(data, MARKER), "the marker is on disk before the erasure"
    assert _files_holding(data, DEVICE.encode())

    r = _cli("erase", "--config", str(gw.config_path), "--device", DEVICE)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    erased = report["erased"]
    assert erased["broker:sessions"] == 1 and erased["broker:subscriptions"] == 1
    assert erased["broker:retained"] == 1 and erased["broker:deliveries"] >= 4
    assert erased["forward:messages"] >= 4
    assert any("already forwarded upstream" in r for r in report["reported"])
    assert _files_holding(data, MARKER) == []
    assert _files_holding(data, DEVICE.encode()) == []
    assert not [p for p in data.rglob("*-wal") if p.stat().st_size > 0]

    # the receipt: chained, signed by the gateway identity, naming the device by hash
    line = (data / "audit" / "erasures.jsonl").read_bytes().splitlines()[-1]
    receipt = json.loads(line)
    digest = hashlib.sha256(DEVICE.encode()).hexdigest()
    assert receipt["device_sha256"] == digest and receipt["alg"] == "ML-DSA-65"
    body = {k: v for k, v in receipt.items() if k not in ("alg", "kid", "sig")}
    signed = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    public = KeyStore(data / "keys").verifier_keyring()
    assert public.verify(bytes.fromhex(receipt["kid"]), signed,
                         base64.b64decode(receipt["sig"]))
    # the erasure request waits in the forward queue for the upstream
    db = sqlite3.connect(data / "forward.db")
    rows = db.execute("SELECT topic, payload FROM messages WHERE topic LIKE '%erasure'").fetchall()
    db.close()
    assert len(rows) == 1 and json.loads(rows[0][1])["device_sha256"] == digest

    # a second erasure of the same id: nothing is held any more
    again = _cli("erase", "--config", str(gw.config_path), "--device", DEVICE)
    assert again.returncode == 1 and "unknown device" in again.stderr

    # restarted: none of the device's data is served, the other device's is
    gw.start()
    sub = PahoClient(gw.port, "keeper", clean_session=False)
    late = PahoClient(gw.port, "late")
    late.subscribe("sensors/#", qos=1)
    got = [m.payload for m in late.get_n(1, 5)] + [m.payload for m in late.drain(0.5)]
    assert got == [b"OTHER-KEEP"]
    queued = [m.payload for m in sub.drain(1.0)]
    assert not [p for p in queued if MARKER in p], queued
    sub.disconnect()
    late.disconnect()


def test_erase_refused_while_running_without_http(gateway: GatewayProcess) -> None:
    """A running gateway is asked through its HTTP API; without one nothing is erased."""
    r = _cli("erase", "--config", str(gateway.config_path), "--device", "x")
    assert r.returncode == 1 and "without an HTTP API" in r.stderr
    assert "nothing was erased" in r.stderr


def test_erasure_on_a_local_broker_claims_nothing_forwarded(gateway: GatewayProcess) -> None:
    dev = PahoClient(gateway.port, DEVICE)
    dev.publish(f"state/{DEVICE}", MARKER, qos=1, retain=True)
    dev.disconnect()
    gateway.stop()
    r = _cli("erase", "--config", str(gateway.config_path), "--device", DEVICE)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["erased"]["broker:retained"] == 1
    assert not [x for x in report["reported"] if "upstream" in x], report["reported"]


def test_a_store_from_before_origins_is_migrated(tmp_path: Path) -> None:
    """Retained rows written before they kept their publisher gain origin NULL (erased by
    topic level) instead of failing to load."""
    from rapidmq_edge.store.session_store import SessionStore

    path = tmp_path / "broker.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, "
               "qos INTEGER NOT NULL, props BLOB NOT NULL, expires_at REAL)")
    db.execute("INSERT INTO retained VALUES ('a/dev1/t', x'01', 0, x'', NULL)")
    db.commit()
    db.close()
    store = SessionStore(path)
    try:
        assert store.load().retained == [("a/dev1/t", b"\x01", 0, b"", None, None)]
    finally:
        asyncio.run(store.close())
