"""The planned forward (``ClientConnection._forward_planned``: a plain QoS 0/1 PUBLISH to a
topic with a route plan is written to its subscribers before its bookkeeping is made) sends
exactly what the general path sends. One seeded scenario of raw MQTT 3.1.1 and 5.0 clients
(subscriptions at QoS 0-2 and overlapping ones, QoS 0-2 and retained publishes, short and
128+ byte messages, a client that holds its acknowledgements past the in-flight window, a
client with topic aliases, persistent sessions reconnecting) runs against a real gateway
with the planned forward on and again with it off: every byte each client receives, and
the acknowledgements of its own publishes, must be the same, and the planned forward must
have carried most of the PUBLISHes."""

from __future__ import annotations

import random
import struct
import sys
import time
from pathlib import Path

from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RawClient,
    build_connect,
    build_publish,
    build_subscribe,
    build_unsubscribe,
    frame,
)

RUNNER = Path(__file__).with_name("forward_path_runner.py")
TOPICS = ("t/a", "t/b", "u/b", "v")
FILTERS = ("t/a", "t/a", "t/+", "t/#", "u/b", "u/+", "v")
#: (protocol level, persistent session, topic alias maximum) per client: the planned
#: forward takes subscribers of the publisher's protocol without topic aliases
CLIENTS = ((4, True, 0), (4, False, 0), (4, False, 0), (5, True, 0), (5, False, 0),
           (5, False, 4))
STEPS = 300

Seen = tuple[int, int, bytes]  # packet type, flags, body


class Peer:
    """One raw client of the scenario: answers what it receives, records it."""

    def __init__(self, port: int, index: int) -> None:
        self.port = port
        self.cid = f"c{index}"
        self.version, self.persistent, self.aliases = CLIENTS[index]
        self.got: list[Seen] = []    # what the gateway sent, but acks of its own publishes
        self.acks: list[Seen] = []   # those acks, in order
        self.outstanding: set[int] = set()
        self.hold = False            # keep QoS 1 deliveries unacknowledged
        self.held: list[int] = []
        self.filters: set[str] = set()
        self.pid = 0
        self.raw = self._connect()

    def _connect(self) -> RawClient:
        raw = RawClient(self.port, version=self.version)
        props = b""
        if self.version == 5:
            if self.persistent:
                props += b"\x11" + struct.pack("!I", 300)  # Session Expiry Interval
            if self.aliases:
                props += b"\x22" + struct.pack("!H", self.aliases)  # Topic Alias Maximum
        raw.send(build_connect(self.cid, clean=not self.persistent,
                               protocol_level=self.version, properties=props))
        p = raw.recv_packet()
        assert p.type == 2 and p.body[1] == 0, p
        return raw

    def reconnect(self) -> None:
        self.raw.close()
        self.outstanding.clear()  # never acknowledged now: the publisher resends nothing here
        self.held.clear()
        self.raw = self._connect()

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        pid = self.next_pid() if qos else 0
        if qos:
            self.outstanding.add(pid)
        self.raw.send(build_publish(topic, payload, qos, pid, retain, version=self.version))

    def round(self) -> bool:
        """PINGREQ, then answer everything before the PINGRESP; True if anything was sent."""
        raw = self.raw
        raw.send(b"\xc0\x00")
        sent = False
        while True:
            p = raw.recv_packet()
            if p.type == PINGRESP:
                return sent
            seen = (p.type, p.flags, p.body)
            if p.type in (PUBACK, PUBREC, PUBCOMP) and self._own(p):
                self.acks.append(seen)
                if p.type == PUBREC:
                    raw.send(frame(0x62, p.body[:2]))  # PUBREL
                    sent = True
                continue
            self.got.append(seen)
            if p.type == PUBLISH and p.flags & 0x06:
                pid = p.body[2 + struct.unpack_from("!H", p.body)[0]:][:2]
                if p.flags & 0x06 == 0x04:
                    raw.send(frame(0x50, pid))  # PUBREC
                elif self.hold:
                    self.held.append(struct.unpack("!H", pid)[0])
                    continue
                else:
                    raw.send(frame(0x40, pid))  # PUBACK
                sent = True
            elif p.type == PUBREL:
                raw.send(frame(0x70, p.body[:2]))  # PUBCOMP
                sent = True

    def _own(self, p: object) -> bool:
        pid = struct.unpack_from("!H", p.body)[0]  # type: ignore[attr-defined]
        if p.type == PUBREC:  # type: ignore[attr-defined]
            return pid in self.outstanding
        if pid in self.outstanding:
            self.outstanding.discard(pid)
            return True
        return False

    def release(self) -> None:
        self.hold = False
        for pid in self.held:
            self.raw.send(frame(0x40, struct.pack("!H", pid)))
        self.held.clear()


def _settle(peers: list[Peer]) -> None:
    """Until no client has anything to answer and every publish is acknowledged (acks may
    wait for the session store's commit), at most 5 s."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        busy = [peer.round() for peer in peers]
        if not any(busy):
            if not any(peer.outstanding for peer in peers):
                return
            time.sleep(0.002)
    raise AssertionError(f"not settled: {[sorted(p.outstanding) for p in peers]}")


def _scenario(port: int, seed: int) -> list[tuple[list[Seen], list[Seen]]]:
    rnd = random.Random(seed)
    peers = [Peer(port, i) for i in range(len(CLIENTS))]
    try:
        for _ in range(STEPS):
            peer = rnd.choice(peers)
            r = rnd.random()
            if r < 0.6:
                size = rnd.choice((0, 5, 40, 200))
                peer.publish(rnd.choice(TOPICS), rnd.randbytes(size),
                             rnd.choice((0, 0, 1, 1, 1, 2)), rnd.random() < 0.08)
            elif r < 0.75:  # mostly one filter per client, sometimes overlapping ones
                if peer.filters and rnd.random() < 0.7:
                    peer.raw.send(build_unsubscribe(peer.next_pid(), sorted(peer.filters),
                                                    peer.version))
                    peer.filters.clear()
                filt = rnd.choice(FILTERS)
                peer.filters.add(filt)
                peer.raw.send(build_subscribe(peer.next_pid(), [(filt, rnd.randrange(3))],
                                              peer.version))
            elif r < 0.8:
                filt = rnd.choice(FILTERS)
                peer.filters.discard(filt)
                peer.raw.send(build_unsubscribe(peer.next_pid(), [filt], peer.version))
            elif r < 0.9:
                if peer.hold:
                    peer.release()
                else:
                    peer.hold = True
            else:
                peer.reconnect()
            _settle(peers)
        for peer in peers:
            peer.release()
        _settle(peers)
        return [(peer.got, peer.acks) for peer in peers]
    finally:
        for peer in peers:
            peer.raw.close()


def _run(tmp: Path, mode: str, seed: int) -> tuple[list[tuple[list[Seen], list[Seen]]], int]:
    count = tmp / f"taken-{mode}"
    (tmp / mode).mkdir()
    gw = GatewayProcess(tmp / mode, {"mqtt": {"max_inflight_messages": 2, "sys_interval": 3600.0}},
                        launcher=[sys.executable, str(RUNNER), mode, str(count)])
    gw.start()
    try:
        out = _scenario(gw.port, seed)
    finally:
        gw.stop()
    return out, int(count.read_text())


def test_planned_forward_sends_what_the_general_path_sends(tmp_path: Path) -> None:
    fast, taken = _run(tmp_path, "on", 17)
    general, none = _run(tmp_path, "off", 17)
    assert none == 0
    published = sum(1 for got, _ in general for t, _f, _b in got if t == PUBLISH)
    assert published > 200  # the scenario delivers plenty
    for i, (a, b) in enumerate(zip(fast, general, strict=True)):
        assert a[0] == b[0], f"client c{i} received other packets"
        assert a[1] == b[1], f"client c{i} got other acknowledgements"
    assert taken > 40, taken  # and a good part of its PUBLISHes took the planned forward
