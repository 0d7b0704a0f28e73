"""The message flow of an uplink session: sending, acknowledgements, incoming messages.

:class:`MessageFlow` is the half of :class:`~.client.UplinkClient` that runs over an
established connection: the in-flight window (packet ids, QoS 2 flows carried across
reconnects), fetching from the :class:`~.source.UplinkSource` and writing PUBLISH batches,
PUBACK/PUBREC/PUBCOMP handling (acks, delayed requeue of v5 nacks), incoming PUBLISHes and
SUBACKs, and the end-to-end heartbeat. Connecting, keep-alive and failover live in
:mod:`.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..mqtt import reasons as rc
from ..mqtt.codec import encode, encode_publish
from ..mqtt.errors import MqttError
from ..mqtt.id_frame import FRAME_PROPS, encode_id_frame
from ..mqtt.packets import (
    DISCONNECT,
    MQTT_5,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    Disconnect,
    Packet,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
)
from ..mqtt.properties import decode_properties, encode_varint
from .endpoint_policy import EndpointPolicy
from .rate import TokenBucket
from .source import OutgoingMessage, UplinkSource
from .transport import UplinkProtocol

__all__ = ["Flight", "MessageCallback", "MessageFlow", "v5_properties"]

log = logging.getLogger(__name__)

_ACK_ONLY = {PUBACK, PUBCOMP}
_RMQ_ID = b"\x26\x00\x06rmq-id"  # User Property "rmq-id" (its value follows)
MessageCallback = Callable[[str, bytes, int, dict[str, Any]], None]


def v5_properties(block: bytes, rmq_id: bytes) -> bytes:
    """The message's encoded property block (as queued: length prefix included, or empty)
    with the ``rmq-id`` User Property appended (after any User Properties of its own, so
    their order is kept). A block that does not decode is left out, the message still goes."""
    tail = _RMQ_ID + len(rmq_id).to_bytes(2, "big") + rmq_id
    if len(block) > 1:
        try:
            _, n = decode_properties(block, 0, len(block), PUBLISH)
        except MqttError:
            n = 0
        if n == len(block):
            start = 1
            while block[start - 1] & 0x80:  # skip the block's own length prefix
                start += 1
            tail = block[start:] + tail
    return encode_varint(len(tail)) + tail


@dataclass(slots=True)
class Flight:
    """One QoS 1/2 PUBLISH in flight; ``qid`` is the queue's id."""

    qid: int
    qos: int
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    sent: float = 0.0  # time.monotonic() when written


class MessageFlow:
    """Sending and receiving over the current connection (mixed into ``UplinkClient``,
    whose ``__init__`` sets the attributes declared here)."""

    name: str
    source: UplinkSource
    version: int
    policy: EndpointPolicy
    bucket: TokenBucket
    gateway_id: str
    nack_delay: float
    poll_interval: float
    on_message: MessageCallback | None
    heartbeat_topic: str | None
    heartbeat_interval: float
    last_heartbeat: float | None
    heartbeat_rtt_ms: float | None
    current_url: str | None
    last_puback: float | None
    last_error: str | None
    sent: int
    acked: int
    nacked: int
    too_large: int
    received: int
    max_inflight: int
    limit: int
    suback_codes: list[int]
    _conn: UplinkProtocol | None
    _inflight: dict[int, Flight]
    _carried: dict[int, int]  # QoS 2 released before a disconnect: pid -> qid
    _in_qos2: set[int]
    _sub_pids: set[int]
    _pid: int
    _max_qos: int
    _max_packet_size: int
    _room: asyncio.Event
    _draining: bool
    _switching: bool
    _delayed: dict[asyncio.TimerHandle, list[int]]

    @property
    def inflight(self) -> int:
        """QoS 1/2 PUBLISHes sent and not yet acknowledged."""
        return len(self._inflight)

    # ------------------------------------------------------------------ in-flight window

    def _resume(self, conn: UplinkProtocol, session_present: bool) -> None:
        """Finish QoS 2 flows released before the last disconnect."""
        if not session_present:
            self._in_qos2.clear()
            if self._carried:  # the server had taken ownership (PUBREC) before it forgot us
                ids = list(self._carried.values())
                self._carried.clear()
                self._ack(ids)
            return
        for pid, qid in self._carried.items():
            self._inflight[pid] = Flight(qid, 2, True, time.monotonic())
            conn.write(encode(Pubrel(pid), self.version))
        self._carried.clear()

    def _lost(self) -> None:
        """Requeue what was in flight; keep released QoS 2 ids for the next session."""
        ids: list[int] = []
        for pid, f in self._inflight.items():
            if f.released:
                self._carried[pid] = f.qid
            else:
                ids.append(f.qid)
        self._inflight.clear()
        self._sub_pids.clear()
        if ids:
            ids.sort()
            self.source.requeue(self.name, ids)

    def _next_pid(self) -> int:
        while True:
            self._pid = self._pid % 65535 + 1
            pid = self._pid
            if pid not in self._inflight and pid not in self._sub_pids and pid not in self._carried:
                return pid

    # ------------------------------------------------------------------ sending

    async def _heartbeat(self, conn: UplinkProtocol, topic: str) -> None:
        """Prove the path end to end: publish a timestamp and watch it come back."""
        while True:
            payload = f"{time.time():.6f}".encode()
            conn.write(encode_publish(topic.encode(), payload, 0, False, False, 0,
                                      b"\x00" if self.version == MQTT_5 else None))
            await asyncio.sleep(self.heartbeat_interval)

    def _heartbeat_back(self, payload: bytes) -> None:
        try:
            sent = float(payload)
        except ValueError:
            return
        now = time.time()
        self.last_heartbeat = now
        self.heartbeat_rtt_ms = round((now - sent) * 1000, 3)

    async def _sender(self, conn: UplinkProtocol) -> None:
        src = self.source
        bucket = self.bucket
        while not self._draining and not self._switching:
            room = self.limit - len(self._inflight)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if not conn.writable.is_set():
                await conn.writable.wait()
                continue
            allowed = bucket.available()
            if allowed < 1:
                await asyncio.sleep(bucket.wait_time())
                continue
            batch = src.fetch(self.name, min(room, allowed))
            bucket.take(len(batch))
            if not batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await src.wait_for_data(self.name)
                continue
            self._send_batch(conn, batch)

    def _send_batch(self, conn: UplinkProtocol, batch: Sequence[OutgoingMessage]) -> None:
        v5 = self.version == MQTT_5
        out: list[bytes] = []
        qos0: list[int] = []
        too_large: list[int] = []
        now = time.monotonic()
        max_qos = self._max_qos
        max_size = self._max_packet_size
        inflight = self._inflight
        rid = f"{self.gateway_id}:".encode()
        for msg in batch:
            qos = msg.qos if msg.qos < max_qos else max_qos
            payload = msg.payload
            if v5:  # the message id as the rmq-id User Property
                props: bytes | None = v5_properties(msg.props, rid + str(msg.id).encode())
            else:
                props = None
                if msg.props == FRAME_PROPS:  # a protected rule's message: id in a frame
                    payload = encode_id_frame(rid + str(msg.id).encode(), payload)
            pid = self._next_pid() if qos else 0  # reserved below, once it is sent
            packet = encode_publish(
                msg.topic.encode(), payload, qos, msg.retain, False, pid, props,
            )
            if max_size and len(packet) > max_size:
                too_large.append(msg.id)  # would be refused by the server on every attempt
                continue
            if qos:
                inflight[pid] = Flight(msg.id, qos, False, now)
            else:
                qos0.append(msg.id)
            out.append(packet)
        if out:
            conn.write(b"".join(out))
            self.sent += len(out)
        if len(inflight) > self.max_inflight:
            self.max_inflight = len(inflight)
        if qos0:
            self._ack(qos0)
        if too_large:
            self.too_large += len(too_large)
            log.warning(
                "uplink %s: %d message(s) larger than the server's Maximum Packet Size "
                "(%d B) dropped", self.name, len(too_large), max_size)
            self.source.drop(self.name, too_large, "too_large")

    def _ack(self, ids: list[int]) -> None:
        self.acked += len(ids)
        self.source.ack(self.name, ids)

    # ------------------------------------------------------------------ receiving

    def _on_packets(
        self, conn: UplinkProtocol, packets: list[Packet], pubacks: Sequence[tuple[int, int]] = (),
    ) -> None:
        """Handle ``pubacks`` (packet id, reason code: the PUBACKs taken off the front by
        :func:`~.ackscan.leading_pubacks`), then ``packets``."""
        if conn is not self._conn:
            return
        acks: list[int] = []
        nacks: list[int] = []
        out: list[bytes] = []
        version = self.version
        lats: list[float] | None = [] if self.policy.wants_latency else None
        now = time.monotonic()
        inflight = self._inflight
        for pid, code in pubacks:
            f = inflight.pop(pid, None)
            if f is None:
                continue
            if code >= 0x80:
                nacks.append(f.qid)
            else:
                acks.append(f.qid)
                if lats is not None:
                    lats.append(now - f.sent)
        for p in packets:
            t = p.type
            if t in _ACK_ONLY:
                assert isinstance(p, (Puback, Pubcomp))
                f = self._inflight.pop(p.packet_id, None)
                if f is None:
                    continue
                if p.reason_code >= 0x80:
                    nacks.append(f.qid)
                else:
                    acks.append(f.qid)
                    if lats is not None:
                        lats.append(now - f.sent)
            elif t == PUBREC:
                assert isinstance(p, Pubrec)
                f = self._inflight.get(p.packet_id)
                if f is None:
                    out.append(encode(Pubrel(p.packet_id, 0x92), version))
                elif p.reason_code >= 0x80:
                    del self._inflight[p.packet_id]
                    nacks.append(f.qid)
                else:
                    f.released = True
                    out.append(encode(Pubrel(p.packet_id), version))
            elif t == PUBLISH:
                assert isinstance(p, Publish)
                self._incoming(p, out)
            elif t == PUBREL:
                assert isinstance(p, Pubrel)
                self._in_qos2.discard(p.packet_id)
                out.append(encode(Pubcomp(p.packet_id), version))
            elif t == SUBACK:
                assert isinstance(p, Suback)
                self._sub_pids.discard(p.packet_id)
                self.suback_codes = p.reason_codes
                if any(c >= 0x80 for c in p.reason_codes):
                    log.warning("uplink %s: subscription refused: %s", self.name, p.reason_codes)
            elif t == DISCONNECT:
                assert isinstance(p, Disconnect)
                self.last_error = f"server DISCONNECT: {rc.describe(p.reason_code)}"
                conn.abort()
        if out:
            conn.write(b"".join(out))
        if acks:
            self.last_puback = time.time()
            self._ack(acks)
            if lats and self.current_url is not None:
                self.policy.observe_acks(self.current_url, lats)
        if nacks:
            self.nacked += len(nacks)
            self.last_puback = time.time()
            loop = asyncio.get_running_loop()
            handle = loop.call_later(self.nack_delay, self._requeue_delayed, nacks)
            self._delayed[handle] = nacks
        if acks or nacks:
            self._room.set()

    def _incoming(self, p: Publish, out: list[bytes]) -> None:
        pid = p.packet_id
        if p.qos == 2:
            out.append(encode(Pubrec(pid), self.version))
            if pid in self._in_qos2:
                return  # already delivered, waiting for PUBREL
            self._in_qos2.add(pid)
        elif p.qos == 1:
            out.append(encode(Puback(pid), self.version))
        if p.topic == self.heartbeat_topic:
            self._heartbeat_back(p.payload)
            return
        self.received += 1
        if self.on_message is not None:
            try:
                self.on_message(p.topic, p.payload, p.qos, p.properties)
            except Exception:
                log.exception("uplink %s: on_message failed", self.name)

    def _requeue_delayed(self, ids: list[int]) -> None:
        for handle, v in list(self._delayed.items()):
            if v is ids:
                del self._delayed[handle]
        self.source.requeue(self.name, ids)
        self._room.set()

    def _flush_delayed(self) -> None:
        if not self._delayed:
            return
        ids: list[int] = []
        for handle, v in self._delayed.items():
            handle.cancel()
            ids.extend(v)
        self._delayed.clear()
        ids.sort()
        self.source.requeue(self.name, ids)

