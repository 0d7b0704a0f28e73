"""Store-and-forward under stress: big backlogs, SIGKILL loops, failover, replication,
bounds, a full disk and a damaged queue file.

Real gateway subprocess, real Mosquitto upstreams on 127.0.0.1. Devices are raw-socket
publishers that pipeline QoS 1 PUBLISHes with a window and record every PUBACK (paho is
too slow for 50,000 messages); the "cloud" consumers are raw-socket MQTT 5 subscribers
(to see the gateway's ``rmq-id`` user property), each in a thread. Every wait is bounded
and every process and socket is stopped at teardown.

The invariant checked everywhere: every message whose PUBACK (reason < 0x80) the device
got reaches the upstream eventually; a duplicate is only ever a re-send of the same
``rmq-id``.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .conftest import LOOPBACK, MosquittoBroker, free_port, wait_for_port
from .gateway_proc import GatewayProcess
from .mqtt5_helpers import (
    CONNACK,
    DISCONNECT,
    PUBACK,
    PUBLISH,
    SUBACK,
    _decode,
    ack_packet,
    connect_packet,
    disconnect_packet,
    props,
    publish_packet,
    subscribe_packet,
)

pytestmark = [pytest.mark.interop, pytest.mark.slow, pytest.mark.timeout(120)]

GW_ID = "test-gw"
PREFIX = f"edge/{GW_ID}/"

# =========================================================================== wire helpers


def _split(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete MQTT packet off the front of ``buf``: (first byte, body)."""
    out: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2:
        length, mult, i = 0, 1, pos + 1
        while True:
            if i >= n:
                length = -1
                break
            b = buf[i]
            i += 1
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        if length < 0 or i + length > n:
            break
        out.append((buf[pos], bytes(buf[i:i + length])))
        pos = i + length
    del buf[:pos]
    return out


class _Sock:
    """A loopback TCP socket with a packet splitter; ``read`` returns None once closed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.early: list[tuple[int, bytes]] = []  # read past the packet ``expect`` wanted
        self.closed = False

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def read(self, timeout: float) -> list[tuple[int, bytes]] | None:
        if self.early:
            early, self.early = self.early, []
            return early
        if self.closed:
            return None
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return []
            data = self.sock.recv(1 << 18)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return None
        self.buf += data
        return _split(self.buf)

    def expect(self, ptype: int, timeout: float = 5.0) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        pending: list[tuple[int, bytes]] = []
        while time.monotonic() < deadline:
            got = self.read(0.1)
            if got is None:
                raise ConnectionError(f"closed while waiting for packet type {ptype}")
            pending += got
            for i, (first, body) in enumerate(pending):
                if first >> 4 == ptype:
                    self.early = pending[:i] + pending[i + 1:]
                    return first, body
        raise AssertionError(f"no packet of type {ptype} within {timeout} s")

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


class Device:
    """A raw-socket QoS 1 publisher keeping ``window`` PUBLISHes in flight.

    ``reasons[i]`` is the PUBACK reason of ``items[i]`` (0 for 3.1.1); ``unacked`` the
    indices sent and never acknowledged; ``broken`` tells the connection was lost.
    """

    def __init__(self, port: int, client_id: str, version: int = 4, window: int = 100) -> None:
        self.v5 = version == 5
        self.window = window
        self.reasons: dict[int, int] = {}
        self.unacked: list[int] = []
        self.sent = 0
        self.broken = False
        self.s = _Sock(port)
        self.s.send(connect_packet(client_id, level=version, keep_alive=60))
        _, body = self.s.expect(CONNACK)
        assert body[1] == 0, f"CONNACK reason {body[1]:#x}"

    def acked(self) -> list[int]:
        """Indices of items the gateway accepted (PUBACK with reason < 0x80)."""
        return sorted(i for i, r in self.reasons.items() if r < 0x80)

    def run(
        self,
        items: Sequence[tuple[str, bytes]],
        timeout: float = 60.0,
        ack_wait: float = 5.0,
        stop_on_refusal: bool = False,
        rate: float = 0.0,
        stop: threading.Event | None = None,
    ) -> Device:
        """Publish ``items`` in order; return when all are acknowledged, the connection is
        lost, ``stop`` is set, or no PUBACK came for ``ack_wait`` s with messages in
        flight. With ``stop_on_refusal`` nothing new is sent after the first reason
        >= 0x80 (what is in flight is still waited for)."""
        props_blob = b"\x00" if self.v5 else b""
        inflight: dict[int, int] = {}  # packet id -> index
        nxt = pid = 0
        t0 = last = time.monotonic()
        deadline = t0 + timeout
        refused = False
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            allowed = len(items)
            if rate:
                allowed = min(allowed, int((time.monotonic() - t0) * rate) + 1)
            if refused:
                allowed = nxt
            out = bytearray()
            while nxt < allowed and len(inflight) < self.window:
                pid = pid % 65535 + 1
                while pid in inflight:
                    pid = pid % 65535 + 1
                topic, payload = items[nxt]
                out += publish_packet(topic, payload, 1, pid, properties=props_blob)
                inflight[pid] = nxt
                nxt += 1
            if out:
                if not self.s.send(bytes(out)):
                    self.broken = True
                    break
                self.sent = nxt
            if nxt >= len(items) and not inflight:
                break
            if inflight and time.monotonic() - last > ack_wait:
                break  # PUBACKs stopped coming
            if refused and not inflight:
                break
            pkts = self.s.read(0.005 if rate and not inflight else 0.2)
            if pkts is None:
                self.broken = True
                break
            for first, body in pkts:
                kind = first >> 4
                if kind == PUBACK:
                    idx = inflight.pop(struct.unpack_from("!H", body)[0], None)
                    if idx is not None:
                        code = body[2] if len(body) > 2 else 0
                        self.reasons[idx] = code
                        last = time.monotonic()
                        if code >= 0x80 and stop_on_refusal:
                            refused = True
                elif kind == DISCONNECT:
                    self.broken = True
        self.unacked = sorted(inflight.values())
        return self

    def close(self) -> None:
        if not self.s.closed:
            self.s.send(disconnect_packet() if self.v5 else b"\xe0\x00")
        self.s.close()


class Cloud:
    """A raw MQTT 5 subscriber on an upstream, reading in a thread.

    ``got`` holds (topic, payload, rmq-id) in arrival order. With ``clean=False`` the
    session (and its subscription) outlives the connection: see :func:`_persistent`.
    """

    def __init__(self, port: int, client_id: str | None = None, topic: str = "edge/#",
                 qos: int = 1, clean: bool = True) -> None:
        self.got: list[tuple[str, bytes, str | None]] = []
        self.lock = threading.Lock()
        self.s = _Sock(port)
        cid = client_id or f"cloud-{time.monotonic_ns()}"
        p = props(session_expiry_interval=3600) if not clean else b"\x00"
        self.s.send(connect_packet(cid, clean_start=clean, properties=p))
        _, body = self.s.expect(CONNACK)
        assert body[1] == 0, f"CONNACK reason {body[1]:#x}"
        self.session_present = bool(body[0] & 1)
        if not self.session_present:
            self.s.send(subscribe_packet(1, [(topic, qos)]))
            _, body = self.s.expect(SUBACK)
            assert body[-1] < 0x80, f"SUBACK {body!r}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _handle(self, pkts: list[tuple[int, bytes]]) -> None:
        acks = bytearray()
        rows: list[tuple[str, bytes, str | None]] = []
        for first, body in pkts:
            if first >> 4 != PUBLISH:
                continue
            p = _decode(first, body, b"", True)
            if p.topic.endswith("/_heartbeat"):
                pass  # the gateway's end-to-end heartbeat, not device data
            else:
                rid = dict(p.properties.get("user_property", [])).get("rmq-id")
                rows.append((p.topic, p.payload, rid))
            if p.qos:
                acks += ack_packet(PUBACK, p.packet_id)
        if acks:
            self.s.send(bytes(acks))
        with self.lock:
            self.got += rows

    def _loop(self) -> None:
        while not self._stop.is_set():
            pkts = self.s.read(0.1)
            if pkts is None:
                return
            self._handle(pkts)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p, _ in self.got]

    def rows(self) -> list[tuple[str, bytes, str | None]]:
        with self.lock:
            return list(self.got)

    def wait_for(self, want: set[bytes], timeout: float) -> set[bytes]:
        """Wait until every payload in ``want`` was seen; return the ones still missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = want - set(self.payloads())
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if not self.s.closed:
            self.s.send(disconnect_packet())
        self.s.close()


@pytest.fixture
def clouds() -> Iterator[Callable[..., Cloud]]:
    made: list[Cloud] = []

    def make(*args: Any, **kw: Any) -> Cloud:
        c = Cloud(*args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _persistent(
    factory: Callable[..., MosquittoBroker], tmp: Path, name: str
) -> tuple[int, Callable[[], MosquittoBroker]]:
    """A stopped upstream on a fixed port that remembers the session of the MQTT 5
    subscriber ``cloud-<name>`` (subscribed to ``edge/#``) across its own restarts.

    Returns (port, start): what the gateway forwards once it is started is queued for
    the subscriber, so ``Cloud(port, "cloud-<name>", clean=False)`` gets all of it.
    """
    port = free_port()
    store = tmp / f"upstream-{name}"
    store.mkdir()
    conf = (
        f"listener {port} {LOOPBACK}\npersistence true\npersistence_location {store}/\n"
        "max_queued_messages 0\nmax_inflight_messages 100\n"
    )

    def start() -> MosquittoBroker:
        broker = factory(conf)
        assert wait_for_port(LOOPBACK, port, 5), f"upstream {name} did not listen on {port}"
        return broker

    first = start()
    sub = Cloud(port, f"cloud-{name}", clean=False)
    assert not sub.session_present
    sub.close()
    first.stop()  # the session and its subscription are saved on exit
    return port, start


def _upstream(name: str, port: int | Sequence[int], **extra: Any) -> dict[str, Any]:
    ports = [port] if isinstance(port, int) else list(port)
    return {"name": name, "urls": [f"mqtt://{LOOPBACK}:{p}" for p in ports],
            "keep_alive": 5, **extra}


def _cfg(upstreams: list[dict[str, Any]], forward: list[dict[str, Any]],
         **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "upstream": upstreams,
        "forward": forward,
        "queue": {"commit_delay_ms": 2.0},
        "mqtt": {"receive_maximum": 1000},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) else v
    return cfg


def _items(topic: str, n: int, tag: str = "m", pad: int = 0) -> list[tuple[str, bytes]]:
    return [(topic, f"{tag}{i:06d}".encode() + b"." * pad) for i in range(n)]


def _acked_payloads(dev: Device, items: Sequence[tuple[str, bytes]]) -> set[bytes]:
    return {items[i][1] for i in dev.acked()}


def _publish(port: int, items: Sequence[tuple[str, bytes]], cid: str, **kw: Any) -> Device:
    version = kw.pop("version", 4)
    window = kw.pop("window", 100)
    dev = Device(port, cid, version, window)
    try:
        dev.run(items, **kw)
    finally:
        dev.close()
    return dev


def _assert_same_id_duplicates(rows: list[tuple[str, bytes, str | None]]) -> None:
    """Every payload has exactly one rmq-id (a duplicate is a re-send of the same id)."""
    ids: dict[bytes, set[str | None]] = {}
    for _, payload, rid in rows:
        ids.setdefault(payload, set()).add(rid)
    bad = {p: r for p, r in ids.items() if len(r) != 1 or None in r}
    assert not bad, f"{len(bad)} payloads with several / missing rmq-ids: {list(bad.items())[:5]}"
    owners: dict[str | None, bytes] = {}
    for payload, rids in ids.items():
        for rid in rids:
            assert owners.setdefault(rid, payload) == payload, f"rmq-id {rid} reused"


def _sys_value(port: int, topic: str, want: Callable[[bytes], bool],
               timeout: float = 6.0) -> bytes | None:
    """Subscribe to a retained ``$SYS`` topic of the gateway; return the first value for
    which ``want`` holds (or the last one seen after ``timeout``)."""
    s = _Sock(port)
    try:
        s.send(connect_packet(f"sys-{time.monotonic_ns()}", level=4))
        s.expect(CONNACK)
        s.send(subscribe_packet(1, [(topic, 0)], properties=b""))
        last: bytes | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pkts = s.read(0.1)
            assert pkts is not None, "gateway closed the $SYS subscriber"
            for first, body in pkts:
                if first >> 4 == PUBLISH:
                    last = _decode(first, body, b"", False).payload
                    if want(last):
                        return last
        return last
    finally:
        s.close()


def _local_roundtrip(port: int) -> None:
    """The gateway still serves: a new client subscribes, publishes QoS 0, gets it back."""
    s = _Sock(port)
    try:
        s.send(connect_packet(f"probe-{time.monotonic_ns()}", level=4))
        _, body = s.expect(CONNACK)
        assert body[1] == 0
        s.send(subscribe_packet(1, [("probe/x", 0)], properties=b""))
        s.expect(SUBACK)
        s.send(publish_packet("probe/x", b"alive", 0, properties=b""))
        _, body = s.expect(PUBLISH)
        assert body.endswith(b"alive")
    finally:
        s.close()


# =========================================================================== 1. backlog


CLASSES = (("alarm", "alarms/a"), ("high", "hi/h"), ("normal", "sensors/n"), ("bulk", "bulk/b"))


def test_50k_backlog_all_arrive_in_class_order(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
    tmp_path: Path,
) -> None:
    """50,000 QoS 1 messages in four priority classes while the upstream is down: after
    it comes back every one arrives, alarms first (newest first), then high, normal,
    bulk (oldest first), each class in sequence order."""
    port, start_upstream = _persistent(mosquitto_factory, tmp_path, "big")
    gw = gateway_factory(_cfg(
        [_upstream("cloud", port)],
        [{"filter": f"{t.split('/')[0]}/#", "upstream": "cloud", "priority": c}
         for c, t in CLASSES],
    ))
    n = 50_000
    items = [(CLASSES[i % 4][1], f"{CLASSES[i % 4][0]}:{i // 4:05d}".encode())
             for i in range(n)]
    t0 = time.monotonic()
    dev = _publish(gw.port, items, "dev-big", window=500, timeout=120, ack_wait=10)
    ingest = time.monotonic() - t0
    acked = dev.acked()
    assert len(acked) == n and not dev.broken, (len(acked), dev.unacked[:5], ingest)
    start_upstream()
    cloud = clouds(port, "cloud-big", clean=False)
    assert cloud.session_present
    missing = cloud.wait_for({p for _, p in items}, 75)
    assert not missing, f"{len(missing)} of {n} lost (ingest took {ingest:.1f} s)"
    seen: set[bytes] = set()
    order: list[tuple[str, int]] = []
    for _, payload, _ in cloud.rows():
        if payload not in seen:  # first arrival of each (re-sends may follow)
            seen.add(payload)
            cls, seq = payload.decode().split(":")
            order.append((cls, int(seq)))
    per_class = {c: [s for k, s in order if k == c] for c, _ in CLASSES}
    count = n // 4
    assert per_class["alarm"] == list(range(count - 1, -1, -1)), "alarms: newest first"
    for cls in ("high", "normal", "bulk"):
        got = per_class[cls]
        assert got == list(range(count)), f"{cls}: first out of order at " + str(
            next((i for i, s in enumerate(got) if s != i), None))
    ranks = [c for c, _ in CLASSES]
    seq_of_classes = [ranks.index(c) for c, _ in order]
    assert seq_of_classes == sorted(seq_of_classes), "strict priority between classes"


# =========================================================================== 2. SIGKILL

N_KILL = 1500  # per ingest phase, at 3000 msg/s: still publishing when the kill comes


def test_sigkill_loop_during_ingest_and_drain(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
) -> None:
    """20 SIGKILLs at random moments (seeded), alternately while devices publish and
    while the backlog drains (a drain-rate cap keeps one): every acknowledged message
    reaches the upstream; duplicates only as re-sends of the same rmq-id."""
    up = mosquitto_factory("max_queued_messages 0\n")
    cloud = clouds(up.port)
    gw = gateway_factory(_cfg(
        [_upstream("cloud", up.port, rate_limit=1500.0)],
        [{"filter": "sensors/#", "upstream": "cloud"}],
    ))
    rng = random.Random(20240607)
    acked: set[bytes] = set()
    sent_total = 0
    kills = {"ingest": 0, "drain": 0}
    drained_while_killed = 0  # drain phases in which messages were flowing
    for cycle in range(20):
        phase = "ingest" if cycle % 2 == 0 else "drain"
        delay = rng.uniform(0.05, 0.3)
        items = _items("sensors/k", N_KILL, f"c{cycle:02d}-")
        dev: Device | None = None
        th: threading.Thread | None = None
        if phase == "ingest":
            dev = Device(gw.port, f"dev-k{cycle}", window=50)
            th = threading.Thread(target=dev.run, args=(items,),
                                  kwargs={"timeout": 10, "rate": 3000.0}, daemon=True)
            th.start()
        before = len(cloud.payloads())
        time.sleep(delay)
        assert gw.proc is not None and gw.proc.poll() is None, f"gateway died:\n{gw.log()}"
        gw.kill()
        kills[phase] += 1
        if phase == "drain" and len(cloud.payloads()) > before:
            drained_while_killed += 1
        if dev is not None and th is not None:
            th.join(15)
            assert not th.is_alive(), "publisher did not notice the kill"
            dev.close()
            acked |= _acked_payloads(dev, items)
            sent_total += dev.sent
        gw.start()
    assert kills == {"ingest": 10, "drain": 10}
    assert drained_while_killed >= 3, "the drain phases had no backlog to be killed in"
    assert len(acked) > 500, f"too little was acknowledged to mean anything: {len(acked)}"
    missing = cloud.wait_for(acked, 45)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost: " + str(
        sorted(missing)[:10])
    rows = cloud.rows()
    _assert_same_id_duplicates(rows)
    assert {p for _, p, _ in rows} <= {p for c in range(20) for _, p in
                                       _items("sensors/k", N_KILL, f"c{c:02d}-")}


# =========================================================================== 3. failover


def test_failover_to_second_url_mid_stream(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
) -> None:
    """Two upstream nodes in ``urls``; the first dies mid-stream. Between them the two
    nodes' subscribers see every acknowledged message, and the uplink ends on node 2."""
    a = mosquitto_factory("max_queued_messages 0\n")
    b = mosquitto_factory("max_queued_messages 0\n")
    # QoS 0 consumers: Mosquitto writes to them at once, so nothing it PUBACKed to the
    # gateway is still queued inside it when it dies.
    sub_a = clouds(a.port, qos=0)
    sub_b = clouds(b.port, qos=0)
    gw = gateway_factory(_cfg(
        [_upstream("cloud", [a.port, b.port])],
        [{"filter": "sensors/#", "upstream": "cloud"}],
    ))
    items = _items("sensors/f", 6000)
    dev = Device(gw.port, "dev-f", window=50)
    th = threading.Thread(target=dev.run, args=(items,),
                          kwargs={"timeout": 40, "rate": 2000.0}, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 10
        while len(sub_a.payloads()) < 1000 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(sub_a.payloads()) >= 1000, "node 1 never got the stream"
        a.stop()  # node 1 dies mid-stream
    finally:
        th.join(45)
        dev.close()
    assert not th.is_alive()
    acked = _acked_payloads(dev, items)
    assert len(acked) == len(items), f"device: {len(acked)} acked, broken={dev.broken}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = set(sub_a.payloads()) | set(sub_b.payloads())
        if acked <= seen:
            break
        time.sleep(0.05)
    seen = set(sub_a.payloads()) | set(sub_b.payloads())
    assert acked <= seen, f"{len(acked - seen)} acknowledged messages lost"
    assert sub_b.payloads(), "node 2 got nothing: no failover"
    _assert_same_id_duplicates(sub_a.rows() + sub_b.rows())
    url = _sys_value(gw.port, "$SYS/broker/forward/upstreams/cloud/current_url",
                     lambda v: v.endswith(str(b.port).encode()))
    assert url == f"mqtt://{LOOPBACK}:{b.port}".encode(), url


# =========================================================================== 4. replication


def test_replication_dead_upstream_never_blocks_live_one(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
    tmp_path: Path,
) -> None:
    """Two upstreams, each with its own forward rule; one is down for the whole run. The
    live one gets everything promptly; once the dead one comes up it gets everything."""
    live = mosquitto_factory("max_queued_messages 0\n")
    live_sub = clouds(live.port)
    dead_port, start_dead = _persistent(mosquitto_factory, tmp_path, "dead")
    gw = gateway_factory(_cfg(
        [_upstream("live", live.port), _upstream("dead", dead_port)],
        [{"filter": "sensors/#", "upstream": "live"},
         {"filter": "sensors/#", "upstream": "dead"}],
    ))
    items = _items("sensors/r", 5000)
    t0 = time.monotonic()
    dev = _publish(gw.port, items, "dev-r", window=200, timeout=30)
    acked = _acked_payloads(dev, items)
    assert len(acked) == len(items), (len(acked), dev.broken)
    missing = live_sub.wait_for(acked, 10)
    took = time.monotonic() - t0
    assert not missing, f"live upstream: {len(missing)} missing after {took:.1f} s"
    assert took < 15, f"live upstream needed {took:.1f} s"
    _assert_same_id_duplicates(live_sub.rows())
    depth = _sys_value(gw.port, "$SYS/broker/forward/upstreams/dead/queued",
                       lambda v: v == str(len(items)).encode())
    assert depth == str(len(items)).encode(), f"dead upstream's queue: {depth!r}"
    start_dead()
    dead_sub = clouds(dead_port, "cloud-dead", clean=False)
    assert dead_sub.session_present
    missing = dead_sub.wait_for(acked, 40)
    assert not missing, f"revived upstream: {len(missing)} of {len(acked)} missing"
    _assert_same_id_duplicates(dead_sub.rows())


# =========================================================================== 5. bounds


def test_class_bounds_drop_oldest_and_refuse_new(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
    tmp_path: Path,
) -> None:
    """``bulk`` (drop_oldest, 100): of 300 only the newest 100 go up, $SYS counts 200
    dropped. ``alarm`` (refuse_new, 10): the 11th gets PUBACK 0x97 (MQTT 5) or no PUBACK
    (3.1.1), is not forwarded, and nothing acknowledged is lost."""
    p1, start1 = _persistent(mosquitto_factory, tmp_path, "b1")
    p2, start2 = _persistent(mosquitto_factory, tmp_path, "b2")
    gw = gateway_factory(_cfg(
        [_upstream("cloud", p1), _upstream("plant", p2)],
        [{"filter": "bulk/#", "upstream": "cloud", "priority": "bulk"},
         {"filter": "alarms/#", "upstream": "cloud", "priority": "alarm"},
         {"filter": "plc/#", "upstream": "plant", "priority": "alarm"}],
        queue={"bulk": {"max_messages": 100}, "alarm": {"max_messages": 10}},
    ))
    bulk = _items("bulk/b", 300, "b")
    dev = _publish(gw.port, bulk, "dev-bulk", window=20)
    assert len(dev.acked()) == 300, "drop_oldest always accepts"
    dropped = _sys_value(gw.port, "$SYS/broker/forward/drops/dropped_oldest",
                         lambda v: v == b"200")
    assert dropped == b"200", dropped

    alarms5 = _items("alarms/x", 11, "a5-")
    v5 = _publish(gw.port, alarms5, "dev-alarm5", version=5, window=1)
    assert [v5.reasons.get(i) for i in range(11)][10] == 0x97, v5.reasons
    assert all(v5.reasons[i] < 0x80 for i in range(10)), v5.reasons

    alarms4 = _items("plc/x", 11, "a4-")
    v4 = Device(gw.port, "dev-alarm311", version=4, window=1)
    try:
        v4.run(alarms4, ack_wait=1.5)
        assert v4.acked() == list(range(10)) and v4.unacked == [10], (v4.reasons, v4.unacked)
        assert not v4.broken, "a refused 3.1.1 publish must not cost the connection"
    finally:
        v4.close()
    refused = _sys_value(gw.port, "$SYS/broker/forward/refused", lambda v: v == b"2")
    assert refused == b"2", refused

    start1()
    start2()
    cloud = clouds(p1, "cloud-b1", clean=False)
    plant = clouds(p2, "cloud-b2", clean=False)
    newest = {p for _, p in bulk[200:]}
    want_cloud = newest | {p for _, p in alarms5[:10]}
    want_plant = {p for _, p in alarms4[:10]}
    assert not cloud.wait_for(want_cloud, 30), "cloud: acknowledged messages lost"
    assert not plant.wait_for(want_plant, 30), "plant: acknowledged messages lost"
    time.sleep(0.5)  # anything that should not be there would have come along
    got = cloud.payloads()
    assert [p for p in got if p.startswith(b"b")][:100] == [p for _, p in bulk[200:]]
    assert set(got) == want_cloud, f"unexpected: {sorted(set(got) - want_cloud)[:5]}"
    assert set(plant.payloads()) == want_plant


# =========================================================================== 6. full disk


def test_full_disk_refuses_but_loses_nothing_acked(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
    tmp_path: Path,
) -> None:
    """data_dir on a 2 MB tmpfs (root) or a ``[queue] max_bytes`` bound (otherwise),
    upstream down, publish until the gateway refuses: it stays up and serves others, and
    every acknowledged message arrives once the upstream is back."""
    port, start_upstream = _persistent(mosquitto_factory, tmp_path, "disk")
    data = tmp_path / "small-disk"
    data.mkdir()
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)],
                           capture_output=True, timeout=10)
        mounted = r.returncode == 0
    # a reserve and no ballast that fit a 2 MB disk (the defaults are for real cards)
    extra: dict[str, Any] = {"gateway": {"id": GW_ID, "data_dir": str(data),
                                         "disk_reserve": 256 << 10, "disk_ballast": 0}}
    forward: dict[str, Any] = {"filter": "sensors/#", "upstream": "cloud"}
    if not mounted:
        extra["queue"] = {"max_bytes": 1_500_000}
        forward["priority"] = "alarm"  # refuse_new: the bound refuses instead of dropping
    gw: GatewayProcess | None = None
    try:
        gw = gateway_factory(_cfg([_upstream("cloud", port)], [forward], **extra))
        items = _items("sensors/d", 6000, pad=1000)
        dev = _publish(gw.port, items, "dev-disk", version=5, window=20,
                       stop_on_refusal=True, ack_wait=5, timeout=60)
        acked = _acked_payloads(dev, items)
        refusals = [i for i, r in dev.reasons.items() if r >= 0x80]
        assert refusals, f"never refused: {len(acked)} acked, unacked={dev.unacked[:5]}"
        assert {dev.reasons[i] for i in refusals} == {0x97}
        if mounted:
            assert "not queued for cloud (sensors/d): disk" in gw.log(), \
                "refused for another reason than the disk"
        assert 200 < len(acked) < len(items), len(acked)
        assert gw.proc is not None and gw.proc.poll() is None, gw.log()[-3000:]
        _local_roundtrip(gw.port)  # still serving other clients
        start_upstream()
        cloud = clouds(port, "cloud-disk", clean=False)
        missing = cloud.wait_for(acked, 40)
        assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost"
        assert gw.proc.poll() is None, gw.log()[-3000:]
        refused_sent = {items[i][1] for i in refusals}
        assert not refused_sent & set(cloud.payloads()), "a refused message was forwarded"
    finally:
        if gw is not None:
            gw.stop()
        if mounted:
            r = subprocess.run(["umount", str(data)], capture_output=True, timeout=10)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(data)], capture_output=True, timeout=10)


# =========================================================================== 7. corruption


def test_corrupt_queue_file_quarantined_and_salvaged(
    mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
    clouds: Callable[..., Cloud],
    tmp_path: Path,
) -> None:
    """``forward.db`` partly overwritten with garbage while the gateway is stopped: it
    starts, serves, forwards the intact messages (and new ones), and keeps the damaged
    file as ``forward.db.corrupt-*``."""
    port, start_upstream = _persistent(mosquitto_factory, tmp_path, "corrupt")
    gw = gateway_factory(_cfg([_upstream("cloud", port)],
                              [{"filter": "sensors/#", "upstream": "cloud"}]))
    items = _items("sensors/c", 3000, pad=200)
    dev = _publish(gw.port, items, "dev-c", window=100)
    assert len(dev.acked()) == len(items)
    gw.stop()
    db = gw.data_dir / "forward.db"
    assert not (gw.data_dir / "forward.db-wal").exists() or \
        (gw.data_dir / "forward.db-wal").stat().st_size == 0, "WAL left after a clean stop"
    size = db.stat().st_size
    page = 4096
    assert size > 60 * page, size
    garbage = random.Random(7).randbytes(3 * page)
    at = (size // page // 2) * page  # three pages in the middle: leaf pages of the table
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(garbage)
    gw.start()
    _local_roundtrip(gw.port)
    corrupt = sorted(gw.data_dir.glob("forward.db.corrupt-*"))
    corrupt = [p for p in corrupt if not p.name.endswith(("-wal", "-shm", "-journal"))]
    assert len(corrupt) == 1, sorted(os.listdir(gw.data_dir))
    kept = corrupt[0].read_bytes()
    assert len(kept) == size and kept[at:at + len(garbage)] == garbage, "damaged file kept"
    assert "damaged" in gw.log() or "salvaged" in gw.log()
    quarantined = _sys_value(gw.port, "$SYS/broker/forward/quarantined",
                             lambda v: b"corrupt" in v)
    assert quarantined is not None and quarantined.endswith(corrupt[0].name.encode())
    fresh = _items("sensors/c", 100, "new-")
    assert len(_publish(gw.port, fresh, "dev-c2").acked()) == 100
    start_upstream()
    cloud = clouds(port, "cloud-corrupt", clean=False)
    assert not cloud.wait_for({p for _, p in fresh}, 30), "new messages not forwarded"
    sent = {p for _, p in items}
    old = sent & set(cloud.payloads())
    # at most the rows of the three damaged pages (~18 per 4 KiB page) may be gone
    deadline = time.monotonic() + 10
    while len(old) < len(items) - 3 * 20 and time.monotonic() < deadline:
        time.sleep(0.1)
        old = sent & set(cloud.payloads())
    assert len(old) >= len(items) - 3 * 20, f"only {len(old)} of {len(items)} salvaged"
    assert set(cloud.payloads()) <= sent | {p for _, p in fresh}, "garbage forwarded"
