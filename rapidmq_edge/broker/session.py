"""MQTT session state: subscriptions, in-flight and queued deliveries, packet identifiers.

A session outlives its network connections when its expiry interval is non-zero. The
session decides *what* to send next (flow control, queue bounds, packet ids); the
connection it is attached to decides *how* (encoding, aliases, the socket).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Protocol

from ..mqtt.packets import Will
from .message import Delivery, Message
from .persistence import delivery_row
from .subscriptions import Subscription

if TYPE_CHECKING:
    from ..store.session_store import SessionStore

NEVER_EXPIRES = 0xFFFFFFFF

#: the queue and the QoS 2 ids of a session that has none yet: shared, never added to (a
#: session makes its own on first use; an idle client then costs no empty deque or set)
_NO_QUEUE: deque[Delivery] = deque()
_NO_IDS: set[int] = set()


class Link(Protocol):
    """What a session needs from the connection it is attached to."""

    send_quota: int  # the client's Receive Maximum

    def send_delivery(self, d: Delivery) -> bool:
        """Write a PUBLISH; False when the client cannot take it (too large: discarded)."""

    def send_plain(self, m: Message) -> bool:
        """Write ``m`` as a QoS 0 PUBLISH without retain flag or subscription identifier
        (``send_delivery`` of such a delivery, without making one)."""

    def send_pubrel(self, packet_id: int) -> None:
        """Write a PUBREL."""

    def congested(self) -> bool:
        """True when the socket's write buffer is over its high-water mark."""


class Session:
    """The server side of one MQTT session."""

    __slots__ = (
        "client_id", "version", "expiry_interval", "subscriptions", "inflight", "queue",
        "inbound_qos2", "link", "username", "will", "will_timer", "expiry_timer", "_next_pid",
        "_seq", "store", "max_queued", "max_queued_bytes", "queued_bytes", "dropped",
    )

    def __init__(
        self,
        client_id: str,
        version: int,
        expiry_interval: int,
        store: SessionStore | None,
        max_queued: int = 1000,
        max_queued_bytes: int = 0,
    ) -> None:
        self.client_id = client_id
        self.version = version
        self.expiry_interval = expiry_interval
        self.subscriptions: dict[str, Subscription] = {}
        self.inflight: dict[int, Delivery] = {}
        self.queue: deque[Delivery] = _NO_QUEUE
        self.inbound_qos2: set[int] = _NO_IDS  # add with add_inbound_qos2
        self.link: Link | None = None
        self.username: str | None = None
        self.will: Will | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self._next_pid = 1
        self._seq = 0
        self.store = store
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self.dropped = 0

    @property
    def persistent(self) -> bool:
        """True when the session outlives the connection (and so is stored)."""
        return self.expiry_interval > 0 and self.store is not None

    # -- delivery ------------------------------------------------------------------

    def deliver(self, d: Delivery) -> bool:
        """Send ``d`` now or queue it; return False when it was dropped."""
        link = self.link
        if d.qos == 0:
            if link is None or link.congested():
                self.dropped += 1
                return False
            link.send_delivery(d)
            return True
        if link is not None and not self.queue and len(self.inflight) < link.send_quota:
            self._send(link, d)
            return True
        if link is None and self.expiry_interval == 0:
            return False
        return self._enqueue(d)

    def deliver_plain(self, m: Message) -> bool:
        """``deliver`` of a QoS 0 delivery without retain flag or subscription identifier
        (the hot path of routing: no Delivery is made); False when it was dropped."""
        link = self.link
        if link is None or link.congested():
            self.dropped += 1
            return False
        link.send_plain(m)
        return True

    def _enqueue(self, d: Delivery) -> bool:
        size = len(d.message.payload)
        if len(self.queue) >= self.max_queued or (
            self.max_queued_bytes and self.queued_bytes + size > self.max_queued_bytes
        ):
            self.dropped += 1
            return False
        if self.queue is _NO_QUEUE:
            self.queue = deque()
        self.queue.append(d)
        self.queued_bytes += size
        if self.persistent and self.store is not None:
            self._seq += 1
            d.seq = self._seq
            self.store.save_delivery(self.client_id, d.seq, delivery_row(d))
        return True

    def _send(self, link: Link, d: Delivery) -> None:
        pid = self.allocate_pid()
        self.track(d, pid)
        if not link.send_delivery(d):
            self.complete(pid)

    def track(self, d: Delivery, pid: int) -> None:
        """Put ``d`` in flight under ``pid`` (from :meth:`allocate_pid`), stored if the
        session is persistent."""
        d.packet_id = pid
        self.inflight[pid] = d
        store = self.store
        if store is not None and self.persistent:
            if not d.seq:
                self._seq += 1
                d.seq = self._seq
            store.save_delivery(self.client_id, d.seq, delivery_row(d))

    def allocate_pid(self) -> int:
        """The next packet identifier not in flight (then :meth:`track` the delivery)."""
        pid = self._next_pid
        inflight = self.inflight
        if pid in inflight:
            for _ in range(65536):
                if pid not in inflight:
                    break
                pid = pid + 1 if pid < 65535 else 1
        self._next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def pump(self) -> None:
        """Move queued deliveries into flight while the client's window allows."""
        link = self.link
        if link is None:
            return
        queue = self.queue
        while queue and len(self.inflight) < link.send_quota:
            d = queue.popleft()
            self.queued_bytes -= len(d.message.payload)
            if d.qos == 0:
                link.send_delivery(d)
            else:
                self._send(link, d)

    def complete(self, pid: int) -> Delivery | None:
        """PUBACK / PUBCOMP received (or the delivery was discarded): free ``pid``."""
        d = self.inflight.pop(pid, None)
        if d is not None and d.seq and self.store is not None and self.persistent:
            self.store.delete_delivery(self.client_id, d.seq)
        return d

    def released(self, pid: int) -> bool:
        """PUBREC received for ``pid``: the message is delivered, PUBREL follows."""
        d = self.inflight.get(pid)
        if d is None or d.qos != 2:
            return False
        if not d.released:
            d.released = True
            if d.seq and self.store is not None and self.persistent:
                self.store.save_delivery(self.client_id, d.seq, delivery_row(d))
        return True

    def resend_inflight(self) -> None:
        """On reconnect: resend unacknowledged PUBLISH (DUP) and PUBREL, in order."""
        link = self.link
        if link is None:
            return
        for pid, d in list(self.inflight.items()):
            if d.released:
                link.send_pubrel(pid)
            elif not link.send_delivery(d):
                self.complete(pid)

    def take_queued_shared(self) -> list[Delivery]:
        """Remove and return queued deliveries of shared subscriptions (to redistribute)."""
        keep: deque[Delivery] = deque()
        out: list[Delivery] = []
        for d in self.queue:
            if d.share is not None:
                out.append(d)
                self.queued_bytes -= len(d.message.payload)
                if d.seq and self.store is not None and self.persistent:
                    self.store.delete_delivery(self.client_id, d.seq)
            else:
                keep.append(d)
        self.queue = keep if keep else _NO_QUEUE
        return out

    def drop_expired(self, now: float) -> int:
        """Remove queued (not in-flight) deliveries whose message expired; how many."""
        if not self.queue:
            return 0
        keep: deque[Delivery] = deque()
        dropped = 0
        for d in self.queue:
            if d.message.expired(now):
                dropped += 1
                self.queued_bytes -= len(d.message.payload)
                if d.seq and self.store is not None and self.persistent:
                    self.store.delete_delivery(self.client_id, d.seq)
            else:
                keep.append(d)
        if dropped:
            self.queue = keep if keep else _NO_QUEUE
        return dropped

    def add_inbound_qos2(self, pid: int) -> None:
        """A QoS 2 PUBLISH ``pid`` was received (until its PUBREL)."""
        if self.inbound_qos2 is _NO_IDS:
            self.inbound_qos2 = set()
        self.inbound_qos2.add(pid)

    def restore(self, deliveries: list[Delivery], inbound_qos2: set[int]) -> None:
        """Load stored deliveries: those with a packet id were in flight."""
        for d in deliveries:
            self._seq = max(self._seq, d.seq)
            if d.packet_id and d.packet_id not in self.inflight:
                d.sent = True
                self.inflight[d.packet_id] = d
            else:
                d.packet_id = 0
                if self.queue is _NO_QUEUE:
                    self.queue = deque()
                self.queue.append(d)
                self.queued_bytes += len(d.message.payload)
        self.inbound_qos2 = set(inbound_qos2) if inbound_qos2 else _NO_IDS
