"""A full disk (a real 16 MiB tmpfs) must never wedge the gateway: it refuses new messages
while the disk is at its reserve, drains what it acknowledged, and accepts again by itself
— no restart, nothing acknowledged lost, no duplicates, a log of a few lines.

Needs root (``mount -t tmpfs``), as CI runs; each test unmounts what it mounted."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from .conftest import MosquittoBroker, free_port
from .gateway_proc import GatewayProcess
from .test_store_forward import Collector, _persistent_cloud

V2 = mqtt.CallbackAPIVersion.VERSION2
pytestmark = pytest.mark.timeout(180)
PAYLOAD = 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                         capture_output=True, text=True, timeout=10)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root, as CI runs): {res.stderr}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


class Publisher:
    """An MQTT 5 device publishing numbered 1 KiB QoS 1 messages; records each PUBACK."""

    def __init__(self, port: int) -> None:
        self.acks: dict[int, int] = {}  # message id -> reason code
        self.numbers: dict[int, int] = {}  # message id -> the number in its payload
        self.lock = threading.Lock()
        self.c = mqtt.Client(V2, client_id=f"dev-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
        self.c.on_publish = self._acked
        ready = threading.Event()
        self.c.on_connect = lambda *a: ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(10)
        self.next = 0

    def _acked(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.acks[mid] = rc.value

    def send(self, n: int, timeout: float = 30.0) -> list[tuple[int, int]]:
        """Publish ``n`` messages, wait for their PUBACKs: [(number, reason code)]."""
        mids = []
        for _ in range(n):
            number = self.next
            self.next += 1
            body = b"%08d" % number + b"x" * (PAYLOAD - 8)
            mid = self.c.publish("full/t", body, qos=1).mid
            with self.lock:
                self.numbers[mid] = number
            mids.append(mid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(m in self.acks for m in mids):
                    break
            time.sleep(0.01)
        with self.lock:
            return [(self.numbers[m], self.acks.get(m, -1)) for m in mids]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _fill(dev: Publisher) -> set[int]:
    """Publish until PUBACK 0x97 (quota exceeded); return the numbers acknowledged."""
    acked: set[int] = set()
    for _ in range(200):
        got = dev.send(100)
        acked |= {n for n, code in got if 0 <= code < 0x80}
        if any(code == 0x97 for _, code in got):
            return acked
    raise AssertionError("the gateway never refused: the disk did not fill")


def _status(gw: GatewayProcess) -> dict[str, Any]:
    return json.loads((gw.data_dir / "status.json").read_text())


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def _numbers(cloud: Collector) -> list[int]:
    with cloud.lock:
        return [int(p[:8]) for _, p, _ in cloud.got]


def _hog(disk: Path) -> Path:
    """Fill ``disk`` to the last byte from outside the gateway; the file that did it."""
    hog = disk / "hog"
    with open(hog, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
        except OSError:
            pass
    assert os.statvfs(disk).f_bavail == 0
    return hog


def _gateway(factory: Callable[..., GatewayProcess], disk: Path, up_port: int,
             **gateway: Any) -> GatewayProcess:
    return factory({
        "gateway": {"data_dir": str(disk / "data"), **gateway},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{up_port}"],
                      "reconnect_max_s": 1}],
        "forward": [{"filter": "full/#", "upstream": "cloud"}],
    })


def test_full_disk_recovers_by_itself_without_loss_or_duplicates(
    small_disk: Path, mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """The issue's reproduction: upstream down, QoS 1 until 0x97, upstream back, drain,
    then a new publish is accepted — within seconds, without a restart."""
    up_port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, up_port, tmp_path)
    gw = _gateway(gateway_factory, small_disk, up_port)
    dev = Publisher(gw.port)
    try:
        acked = _fill(dev)
        # 16 MiB less the reserve (8 MiB, at most a quarter of the disk: 4 MiB), the 2 MiB
        # ballast and up to 4 MiB of WAL
        assert len(acked) > 2000, len(acked)
        _until(lambda: _status(gw)["forwarding"]["drops"]["disk_full"] >= 1, 5,
               "status counts the refusals")
        st = _status(gw)
        assert st["disk"]["below_reserve"] and st["disk"]["reserve_bytes"] == 4 << 20
        start_upstream()
        cloud = Collector(up_port, "edge/#", client_id="cloud")
        try:
            _until(lambda: set(_numbers(cloud)) >= acked, 60, "the backlog delivered")
            drained = time.monotonic()
            # accepted again by itself: the deletes committed, the reserve is free again
            after: list[tuple[int, int]] = []

            def accepted() -> bool:
                after.extend(dev.send(1, timeout=5))
                return 0 <= after[-1][1] < 0x80
            _until(accepted, 10, "a new publish accepted after the drain")
            recovered_in = time.monotonic() - drained
            _until(lambda: after[-1][0] in _numbers(cloud), 10, "the new message forwarded")
            numbers = _numbers(cloud)
        finally:
            cloud.close()
    finally:
        dev.close()
    assert recovered_in < 10
    assert acked <= set(numbers)  # nothing acknowledged lost
    assert len(numbers) == len(set(numbers)), "duplicates upstream"
    _until(lambda: _status(gw)["forwarding"]["queued"] == 0, 10, "the queue empty")
    wal = small_disk / "data" / "forward.db-wal"
    assert not wal.exists() or wal.stat().st_size < 1 << 20  # the drain gave its space back
    log = gw.log()
    assert "Future exception was never retrieved" not in log and "Traceback" not in log
    assert log.count("not queued for cloud") <= 3, log  # once, not per refused message
    assert len(log.splitlines()) < 40, log


def test_disk_filled_by_another_process_releases_the_ballast(
    small_disk: Path, mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    """Something else fills the disk to the last byte: the deletes of the drain find no
    room, the gateway deletes its ballast, drains, and is whole again once space is back."""
    up_port = free_port()
    start_upstream = _persistent_cloud(mosquitto_factory, up_port, tmp_path)
    gw = _gateway(gateway_factory, small_disk, up_port, disk_reserve=1 << 20)
    dev = Publisher(gw.port)
    hog = small_disk / "hog"
    try:
        acked = {n for n, code in dev.send(2000) if 0 <= code < 0x80}
        assert len(acked) == 2000
        assert (small_disk / "data" / "disk-ballast").stat().st_size == 2 << 20
        # an empty WAL (as after any checkpoint): the drain's deletes will need new blocks
        db = sqlite3.connect(small_disk / "data" / "forward.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        db.close()
        _hog(small_disk)  # every byte left
        # what still fits in SQLite's own files is stored and acknowledged; then refusals
        more = dev.send(20)
        acked |= {n for n, code in more if 0 <= code < 0x80}
        assert more[-1][1] == 0x97, more
        start_upstream()
        cloud = Collector(up_port, "edge/#", client_id="cloud")
        try:
            _until(lambda: set(_numbers(cloud)) >= acked, 60, "the backlog delivered")
            _until(lambda: _status(gw)["forwarding"]["queued"] == 0, 20, "the queue empty")
            st = _status(gw)
            assert st["disk"]["ballast_releases"] == 1 and st["disk"]["ballast_bytes"] == 0
            hog.unlink()  # the space is back: the ballast is written again by itself
            _until(lambda: _status(gw)["disk"]["ballast_bytes"] == 2 << 20, 15,
                   "the ballast restored")
            ok = dev.send(10)
            assert all(0 <= code < 0x80 for _, code in ok)
            _until(lambda: {n for n, _ in ok} <= set(_numbers(cloud)), 10, "forwarded")
            numbers = _numbers(cloud)
        finally:
            cloud.close()
    finally:
        dev.close()
        hog.unlink(missing_ok=True)
    assert acked <= set(numbers) and len(numbers) == len(set(numbers))
    assert "deleted the 2097152-byte ballast" in gw.log()
    assert "Future exception was never retrieved" not in gw.log()


def test_broker_state_on_a_disk_filled_by_another_process(
    small_disk: Path, gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """A local broker (no forwarding) whose disk something else filled: the failed commit
    of a retained message is seen as a full disk (SQLite had rolled the transaction back;
    rolling back again raised "cannot rollback" and hid that, so the ballast stayed and every
    retry failed), the ballast goes, the retry commits, the message survives a restart."""
    from .mqtt_helpers import PUBACK, RawClient, unique

    gw = gateway_factory({"gateway": {"data_dir": str(small_disk / "data")}})
    assert (small_disk / "data" / "disk-ballast").stat().st_size == 2 << 20
    hog = _hog(small_disk)
    try:
        topic, body = unique("full/retained"), os.urandom(300 << 10)
        topic3 = unique("full/retained3")
        with RawClient(gw.port, version=5) as pub, RawClient(gw.port) as pub3:
            assert pub.connect(unique("full-pub"))[1] == 0
            assert pub3.connect(unique("full-pub3"))[1] == 0
            pid = pub.publish(topic, body, qos=1, retain=True)
            pid3 = pub3.publish(topic3, b"3.1.1", qos=1, retain=True)  # likely the same commit
            ack = pub.expect(PUBACK, timeout=10)  # 0x97: the first commit failed
            assert ack.body[:3] == pid.to_bytes(2, "big") + b"\x97", ack.body
            # 3.1.1 cannot say 0x97: its PUBACK comes once the retry has stored the message
            assert pub3.expect(PUBACK, timeout=10).body[:2] == pid3.to_bytes(2, "big")
        _until(lambda: "commits succeed again" in gw.log(), 10, "the retry committed")
        log = gw.log()
        assert "deleted the 2097152-byte ballast" in log
        assert "database or disk is full" in log and "cannot rollback" not in log
        gw.stop()
        gw.start()
        with RawClient(gw.port) as sub:
            assert sub.connect(unique("full-sub"))[1] == 0
            assert sub.subscribe([(topic, 1)]) == [1]
            got = sub.expect_publish(timeout=10)
            assert (got.topic, got.payload, got.retain) == (topic, body, True)
            assert sub.subscribe([(topic3, 1)]) == [1]
            got = sub.expect_publish(timeout=10)
            assert (got.topic, got.payload, got.retain) == (topic3, b"3.1.1", True)
    finally:
        hog.unlink(missing_ok=True)
