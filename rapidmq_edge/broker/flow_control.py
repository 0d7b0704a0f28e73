"""Flow control of a broker connection: ordered acks, publish rate, backpressure.

:class:`FlowControl` is mixed into :class:`~.connection.ClientConnection`:

* acknowledgements go out in order, each only once the data it confirms is committed
  (3.1.1 clients, which have no Receive Maximum, are pushed back by pausing reading while
  too many acks wait);
* a token bucket limits a client's PUBLISH rate (``limit_rate``);
* a publisher whose messages went to a subscriber with a full socket stops being read until
  that subscriber drains, or ``PRESSURE_TIMEOUT`` passes. A subscriber that has not drained
  for ``PRESSURE_TIMEOUT`` is stalled: it holds no publisher back any more, its QoS 0
  messages are dropped above ``HIGH_WATER`` (counted in ``publish_dropped``) until it drains.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import math
import termios
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..mqtt import reasons as rc
from ..mqtt.codec import encode
from ..mqtt.errors import MqttError
from ..mqtt.packets import PUBACK, PUBREC, Packet
from .message import Message
from .negotiation import ConnectionSettings
from .session import Session

if TYPE_CHECKING:
    from .broker import Broker
    from .connection import Transport

__all__ = ["Ack", "FlowControl", "HIGH_WATER", "PRESSURE_TIMEOUT"]

HIGH_WATER = 8 * 1024 * 1024  # bytes buffered for a client before QoS 0 is dropped
PRESSURE_TIMEOUT = 2.0  # longest a publisher waits for a slow subscriber before drops start

#: an acknowledgement, the commit it waits for, what runs after it is written, and the
#: message it acknowledges (for a refusal found after the publish: ``Message.refused``)
Ack = tuple[Packet, asyncio.Future[None] | None, Callable[[], None] | None, Message | None]


class FlowControl:
    """Ack ordering, rate limiting and backpressure (mixed into ``ClientConnection``, whose
    ``__init__`` sets the attributes declared here)."""

    if not TYPE_CHECKING:  # no instance dict: ClientConnection declares the slots
        __slots__ = ()

    settings: ConnectionSettings
    broker: Broker
    transport: Transport
    loop: asyncio.AbstractEventLoop
    version: int
    v5: bool
    session: Session | None
    closed: bool
    publish_rate: float
    publish_burst: float
    write_paused: bool
    _paused_since: float
    _out_size: int
    _acks: deque[Ack] | None
    _inbound_unacked: int
    _tokens: float
    _token_time: float
    _paused: bool
    _ack_backlog: bool
    _held: list[Packet] | None
    _pressure_waiters: set[FlowControl] | None
    _pressure: asyncio.TimerHandle | None

    if TYPE_CHECKING:  # provided by ClientConnection
        def _dispatch(self, p: Packet) -> None: ...
        def _protocol_failure(self, exc: MqttError) -> None: ...
        def _write(self, data: bytes) -> None: ...

    # -- acks behind commits -------------------------------------------------------

    def _queue_ack(
        self, ack: Packet, fut: asyncio.Future[None] | None,
        then: Callable[[], None] | None = None, msg: Message | None = None,
    ) -> None:
        """Send acknowledgements in order, each only after its data is committed;
        ``then`` runs right after ``ack`` is written (not when it is withheld)."""
        if fut is None and not self._acks and (msg is None or msg.refused is None):
            self._write(encode(ack, self.version))
            if then is not None:
                then()
            return
        if ack.type == PUBACK:
            self._inbound_unacked += 1
        acks = self._acks
        if acks is None:
            acks = self._acks = deque()
        # Acks waiting for the same (shared, group commit) future need one callback: it
        # drains them all, in order, when the commit is done.
        if fut is not None and not (acks and acks[-1][1] is fut):
            fut.add_done_callback(self._drain_acks)
        acks.append((ack, fut, then, msg))

    def _drain_acks(self, _f: object = None) -> None:
        acks = self._acks
        while acks:
            ack, fut, then, msg = acks[0]
            if fut is not None and not fut.done():
                break
            acks.popleft()
            if ack.type == PUBACK:
                self._inbound_unacked -= 1
            if self.closed:
                continue
            refused = msg.refused if msg is not None else None
            if refused is not None or (
                    fut is not None and (fut.cancelled() or fut.exception() is not None)):
                # Not stored: never acknowledge. 5.0 says why; 3.1.1 withholds the ack.
                if self.v5 and ack.type in (PUBACK, PUBREC):
                    ack.reason_code = (  # type: ignore[union-attr]
                        refused.reason_code if refused is not None else rc.QUOTA_EXCEEDED)
                    session = self.session
                    if ack.type == PUBREC and session is not None:
                        pid = ack.packet_id  # type: ignore[union-attr]
                        session.inbound_qos2.discard(pid)
                        if session.persistent and session.store is not None:
                            # the retried batch must not bring the refused id back
                            session.store.delete_inbound_qos2(session.client_id, pid)
                else:
                    continue
            self._write(encode(ack, self.version))
            if then is not None:
                then()
        if self._ack_backlog and self._inbound_unacked < self.settings.receive_maximum:
            self._ack_backlog = False
            if not self.closed and not self._paused and self._pressure is None:
                self.transport.resume_reading()

    # -- publish rate --------------------------------------------------------------

    def limit_rate(self, rate: float) -> None:
        """Limit this client's PUBLISH rate to ``rate`` per second from now on (a token
        bucket: reading pauses while it is empty); a lower configured limit stays."""
        if self.publish_rate and self.publish_rate <= rate:
            return
        self.publish_rate = rate
        self.publish_burst = max(1.0, float(math.ceil(rate)))
        self._tokens = min(self._tokens, self.publish_burst)
        self._token_time = self.loop.time()

    def restore_rate(self) -> None:
        """Lift a :meth:`limit_rate`: back to the configured rate (``[mqtt] publish_rate``,
        0 = unlimited)."""
        s = self.settings
        self.publish_rate = s.publish_rate
        self.publish_burst = float(s.publish_burst or max(1.0, s.publish_rate))
        self._tokens = self.publish_burst
        self._token_time = self.loop.time()

    def pending_input(self) -> int:
        """Bytes the client sent that wait to be read: in the socket's receive buffer and
        in packets held behind the rate limit (what a throttled client keeps sending)."""
        held = sum(len(getattr(p, "payload", b"")) + 4 for p in self._held or ())
        sock = getattr(self.transport, "get_extra_info", lambda _n: None)("socket")
        if sock is None:
            return held
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        except (OSError, ValueError):
            return held
        return held + buf[0]

    def _throttle(self) -> None:
        rate = self.publish_rate
        now = self.loop.time()
        self._tokens = min(self.publish_burst, self._tokens + (now - self._token_time) * rate)
        self._token_time = now
        self._tokens -= 1
        if self._tokens < 0 and not self._paused:
            self.broker.stats.rate_limited += 1
            self._paused = True
            self.transport.pause_reading()
            if self._held is None:  # the rest of the bytes already read waits as well
                self._held = []
            self.loop.call_later(-self._tokens / rate, self._unthrottle)

    def _unthrottle(self) -> None:
        self._paused = False
        held, self._held = self._held or [], None
        for i, packet in enumerate(held):
            if self.closed:
                return
            if self._held is not None:  # throttled again: the rest waits for the next turn
                self._held.extend(held[i:])
                return
            try:
                self._dispatch(packet)
            except MqttError as exc:
                self._protocol_failure(exc)
                return
        if not self.closed and not self._ack_backlog and self._pressure is None:
            self.transport.resume_reading()

    # -- backpressure --------------------------------------------------------------

    def pause_writing(self) -> None:
        """The socket's write buffer is above its high-water mark."""
        self.write_paused = True
        self._paused_since = self.loop.time()

    def resume_writing(self) -> None:
        """The socket drained: let publishers waiting on this client go on."""
        self.write_paused = False
        waiters, self._pressure_waiters = self._pressure_waiters, None
        for w in waiters or ():
            w._release_pressure()

    def _wait_for_subscribers(self, blocked: list[FlowControl]) -> None:
        for link in blocked:
            if link is not self:
                if link._pressure_waiters is None:
                    link._pressure_waiters = set()
                link._pressure_waiters.add(self)
        blocked.clear()
        if self._pressure is None and not self.closed:
            self.transport.pause_reading()
            self._pressure = self.loop.call_later(PRESSURE_TIMEOUT, self._release_pressure)

    def _release_pressure(self) -> None:
        if self._pressure is None:
            return
        self._pressure.cancel()
        self._pressure = None
        if not self.closed and not self._paused and not self._ack_backlog:
            self.transport.resume_reading()

    def _block_publisher(self) -> None:
        """This client's socket is full: the publisher being dispatched waits for it to
        drain, unless it has not drained for ``PRESSURE_TIMEOUT`` (stalled)."""
        if self.loop.time() - self._paused_since < PRESSURE_TIMEOUT:
            self.broker.blocked_links.append(self)

    def congested(self) -> bool:
        """True when this client's outgoing bytes (the transport's buffer and output not yet
        handed to it) are over ``HIGH_WATER``: a QoS 0 message is dropped. The publisher
        then waits as for a full socket (a stalled subscriber holds nobody back)."""
        if self.transport.get_write_buffer_size() + self._out_size <= HIGH_WATER:
            return False
        if self.write_paused:
            self._block_publisher()
        return True
