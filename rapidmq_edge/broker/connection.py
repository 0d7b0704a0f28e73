"""One client's MQTT connection: packets in, broker calls, packets out.

Transport-agnostic: the listener hands it a :class:`Transport` (TCP, TLS or WebSocket)
and feeds it bytes. The codec underneath is sans-I/O; :class:`ClientConnection` owns the
protocol rules that need connection state, split by concern:

* :mod:`.connect_handshake`: CONNECT to CONNACK (refusal, authentication, session terms);
* :mod:`.flow_control`: acks ordered behind commits, publish rate, backpressure;
* :mod:`.publish_path`: PUBLISH in (topic aliases, authorisation, the planned forward),
  deliveries out, the QoS 1/2 handshakes;
* this module: packet dispatch, SUBSCRIBE/UNSUBSCRIBE, keep-alive, DISCONNECT and closing,
  output buffering.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from ..mqtt import reasons as rc
from ..mqtt.codec import PacketReader, encode, suback_bytes
from ..mqtt.errors import MqttError, UnsupportedProtocolVersion
from ..mqtt.mountpoint import TenantMount
from ..mqtt.packets import (
    AUTH,
    CONNECT,
    DISCONNECT,
    MQTT_5,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
    Connack,
    Disconnect,
    Packet,
    Pingresp,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from ..mqtt.topics import valid_subscription_filter
from .broker import Broker
from .connect_handshake import ConnectHandshake
from .flow_control import Ack, FlowControl
from .negotiation import ConnectionSettings
from .policy import AccessPolicy, BehaviourObserver
from .publish_path import PublishPath
from .session import Session
from .timer_wheel import TimerWheel

log = logging.getLogger(__name__)

LINGER = 1.0  # longest a connection stays half-closed after a DISCONNECT with a reason
FLUSH_AT = 64 * 1024  # output queued in one loop turn that is written at once
#: ``Broker.flush_queue`` while a lone packet is processed: output is written at once
WRITE_NOW: tuple[()] = ()


class Transport(Protocol):
    """The part of an asyncio transport a connection uses."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class ClientConnection(ConnectHandshake, FlowControl, PublishPath):
    """Server side of one network connection."""

    __slots__ = (
        "broker", "access", "settings", "transport", "peer", "on_close", "listener", "watch",
        "loop", "reader", "version", "v5", "session", "client_id", "username", "closed",
        "send_quota", "max_out_size", "alias_max_out", "aliases_out", "aliases_in",
        "keep_alive", "last_rx", "wheel", "_ka_slot", "_out", "_out_size", "_flush_scheduled",
        "_acks", "_connack", "_connect_refusal", "_inbound_unacked", "publish_rate",
        "publish_burst", "_tokens", "_linger", "_token_time", "_paused", "_ack_backlog",
        "_held", "write_paused", "_paused_since", "_pressure_waiters", "_pressure",
        "_acl_cache", "mount",
    )

    def __init__(
        self,
        broker: Broker,
        access: AccessPolicy,
        settings: ConnectionSettings,
        transport: Transport,
        peer: str,
        on_close: Callable[[ClientConnection], None] | None = None,
        watch: BehaviourObserver | None = None,
    ) -> None:
        self.broker = broker
        self.access = access
        self.settings = settings
        self.transport = transport
        self.peer = peer
        self.on_close = on_close
        #: the configured listener URL the client came in through (set by the ingress)
        self.listener = ""
        #: the client-behaviour hooks (the threat watch) or None
        self.watch = watch
        self.loop = asyncio.get_running_loop()
        self.reader = PacketReader(settings.max_packet_size)
        self.version = 0
        self.v5 = False
        self.session: Session | None = None
        self.client_id = ""
        self.username: str | None = None
        self.closed = False
        self.send_quota = min(65535, settings.max_inflight_messages)
        self.max_out_size = 268_435_460
        self.alias_max_out = 0
        self.aliases_out: dict[str, int] = {}
        self.aliases_in: dict[int, str] = {}
        self.keep_alive = 0
        self.last_rx = now = self.loop.time()
        wheel = broker.wheel
        if wheel is None or wheel.loop is not self.loop:
            wheel = broker.wheel = TimerWheel(self.loop)
        self.wheel = wheel
        #: the wheel slot of the keep-alive (or CONNECT) deadline; 0: none
        self._ka_slot = wheel.add(self, settings.connect_timeout)
        self._out: list[bytes] = []
        self._out_size = 0  # bytes in _out: queued for the socket, counted as buffered
        self._flush_scheduled = False
        # acks waiting for a commit (or behind one), each with what to do once it is sent
        self._acks: deque[Ack] | None = None  # made on first use
        # a CONNACK waiting for the session's commit: until it is sent nothing else goes out
        self._connack: bytes | None = None
        self._connect_refusal = 0  # a CONNACK reason code: refuse the CONNECT with it
        self._inbound_unacked = 0
        self.publish_rate = settings.publish_rate  # PUBLISH/s, 0 = unlimited (limit_rate)
        self.publish_burst = float(settings.publish_burst or max(1.0, settings.publish_rate))
        self._tokens = self.publish_burst
        self._linger = False  # close() half-closes: the peer reads our DISCONNECT first
        self._token_time = now
        self._paused = False
        self._ack_backlog = False  # 3.1.1: reading paused until pending acks drain
        self._held: list[Packet] | None = None
        # Backpressure: a publisher whose messages went to a subscriber with a full socket
        # stops being read until that subscriber drains (or PRESSURE_TIMEOUT passes).
        self.write_paused = False
        self._paused_since = 0.0  # when write_paused was last set (a stall is timed from it)
        self._pressure_waiters: set[FlowControl] | None = None  # made on first use
        self._pressure: asyncio.TimerHandle | None = None
        #: PUBLISH decisions of the ACL: (rules generation, {(topic, qos, retain): allowed});
        #: at QoS 0 without retain the key is the topic alone
        self._acl_cache: tuple[int, dict[str | tuple[str, int, bool], bool]] | None = None
        #: a tenant's invisible mountpoint (then this is a MountedConnection), else None
        self.mount: TenantMount | None = None

    # -- bytes in ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Feed bytes from the network."""
        if self.closed:
            return
        broker = self.broker
        # What these bytes make any connection write (deliveries, acknowledgements) goes to
        # the sockets when they are processed, not from a call_soon on the next loop turn:
        # that turn first runs every timer that is due, which made ~1 % of the deliveries
        # at 1,000 msg/s 0.1-0.2 ms later. Still one write per connection per read.
        own = broker.flush_queue is None
        if own:
            broker.flush_queue = []
        try:
            self.last_rx = self.loop.time()
            broker.stats.bytes_received += len(data)
            reader = self.reader
            if not self.version and b"\x00\x04MQTT\x05" in data[:16]:
                self.v5 = True  # a CONNECT for 5.0, even if it fails to decode
            try:
                packets = reader.feed(data)
            except MqttError as exc:
                self._protocol_failure(exc)
                return
            if own and len(packets) == 1:
                # a lone packet (a paced publisher): its delivery goes out as it is made,
                # before the acknowledgement is built; batching has nothing to gather
                broker.flush_queue = WRITE_NOW
            for p in packets:
                if self.closed:
                    return
                if self._held is not None:  # CONNECT still being authenticated
                    self._held.append(p)
                    continue
                try:
                    if p.type == PUBLISH:  # the hot path, without the dispatch
                        self._on_publish(p)  # type: ignore[arg-type]
                    else:
                        self._dispatch(p)
                except MqttError as exc:
                    self._protocol_failure(exc)
                    return
            if reader.error is not None and not self.closed:
                err = reader.error
                self._protocol_failure(err if isinstance(err, MqttError) else MqttError(str(err)))
        finally:
            if own:
                queue = broker.flush_queue or ()
                broker.flush_queue = None
                for c in queue:
                    c._flush()

    def _dispatch(self, p: Packet) -> None:
        t = p.type
        if t == PUBLISH:
            self._on_publish(p)  # type: ignore[arg-type]
        elif t in (PUBACK, PUBCOMP):
            self._on_complete(p.packet_id)  # type: ignore[union-attr]
        elif t == PUBREC:
            self._on_pubrec(p)  # type: ignore[arg-type]
        elif t == PUBREL:
            self._on_pubrel(p)  # type: ignore[arg-type]
        elif t == PINGREQ:
            self._write(encode(Pingresp(), self.version))
        elif t == SUBSCRIBE:
            self._on_subscribe(p)  # type: ignore[arg-type]
        elif t == UNSUBSCRIBE:
            self._on_unsubscribe(p)  # type: ignore[arg-type]
        elif t == DISCONNECT:
            self._on_disconnect(p)  # type: ignore[arg-type]
        elif t == CONNECT:
            self._on_connect(p)  # type: ignore[arg-type]
        elif t == AUTH:
            self.disconnect(rc.PROTOCOL_ERROR, "no authentication exchange in progress")
        else:  # a server-to-client packet sent by a client
            self.disconnect(rc.PROTOCOL_ERROR, f"unexpected packet type {t}")

    def _protocol_failure(self, exc: MqttError) -> None:
        st = self.broker.stats
        if exc.reason_code == rc.PACKET_TOO_LARGE:
            st.too_large += 1
        else:
            st.malformed += 1
        log.info("client %s (%s): %s, closing", self.client_id or "?", self.peer, exc)
        if self.session is None:
            if isinstance(exc, UnsupportedProtocolVersion):
                self._write(b"\x20\x02\x00\x01")  # 3.1.1 CONNACK: unacceptable protocol version
            elif self.v5:
                self.version = MQTT_5
                self._write(encode(Connack(False, exc.reason_code), MQTT_5))
            self.close(send_will=True)
            return
        self.disconnect(exc.reason_code, str(exc))

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------

    def _on_subscribe(self, p: Subscribe) -> None:
        session = self.session
        assert session is not None
        broker = self.broker
        sub_ids = p.properties.get("subscription_identifier")
        sub_id = sub_ids[0] if sub_ids else None
        codes: list[int] = []
        granted: list[tuple[str, bool]] = []
        for filt, opts in p.topics:
            if filt.startswith("$share/") and opts.no_local:
                raise MqttError("no local on a shared subscription")
            if not valid_subscription_filter(filt):  # invalid before unauthorised
                codes.append(rc.TOPIC_FILTER_INVALID if self.v5 else 0x80)
                continue
            allowed = self.access.can_subscribe(self.username, self.client_id, filt, opts.qos)
            if self.watch is not None:
                self.watch.subscribed(self.client_id, filt, allowed)
            if not allowed:
                codes.append(rc.NOT_AUTHORIZED if self.v5 else 0x80)
                continue
            code, existed = broker.subscribe(session, filt, opts, sub_id, checked=True)
            if code >= 0x80:
                codes.append(code if self.v5 else 0x80)
                continue
            codes.append(code)
            granted.append((filt, existed))
        fut = None
        if granted and session.persistent and session.store is not None:
            fut = session.store.commit_future()  # SUBACK: the subscriptions are stored
        if fut is None and not self._acks:  # the SUBACK goes out now (as _queue_ack would)
            self._write(suback_bytes(p.packet_id, codes, self.v5))
            subs = session.subscriptions
            for filt, existed in granted:
                sub = subs.get(filt)
                if sub is not None:
                    broker.send_retained(session, filt, sub.options, existed)
            return

        def send_retained() -> None:  # after the SUBACK
            s = self.session
            for filt, existed in granted:
                sub = s.subscriptions.get(filt) if s is not None else None
                if s is not None and sub is not None:  # (not unsubscribed since)
                    broker.send_retained(s, filt, sub.options, existed)

        self._queue_ack(Suback(p.packet_id, codes), fut, send_retained if granted else None)

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        session = self.session
        assert session is not None
        may = self.access.can_unsubscribe
        codes = [
            rc.NOT_AUTHORIZED if not may(self.username, self.client_id, f)
            else rc.SUCCESS if self.broker.unsubscribe(session, f) else rc.NO_SUBSCRIPTION_EXISTED
            for f in p.topics
        ]
        fut = None
        if rc.SUCCESS in codes and session.persistent and session.store is not None:
            fut = session.store.commit_future()  # UNSUBACK: the removal is stored
        self._queue_ack(Unsuback(p.packet_id, codes if self.v5 else []), fut)

    # -- DISCONNECT and closing ----------------------------------------------------

    def _on_disconnect(self, p: Disconnect) -> None:
        session = self.session
        assert session is not None
        new_expiry = p.properties.get("session_expiry_interval")
        if new_expiry is not None:
            if session.expiry_interval == 0 and new_expiry:
                self.disconnect(rc.PROTOCOL_ERROR, "session expiry changed from 0")
                return
            was_stored = session.persistent
            session.expiry_interval = min(int(new_expiry), self.settings.max_session_expiry)
            if was_stored and not session.persistent and session.store is not None:
                session.store.delete_session(session.client_id)  # it ends now: not restored
        self.close(send_will=p.reason_code == rc.DISCONNECT_WITH_WILL)

    def disconnect(self, reason: int, why: str = "") -> None:
        """Close with a DISCONNECT carrying ``reason`` (MQTT 5 only)."""
        if self.closed:
            return
        if self.v5 and self.session is not None:
            props = {"reason_string": why} if why else {}
            self._write(encode(Disconnect(reason, props), MQTT_5))
            self._linger = True
        self.close(send_will=True)

    def take_over(self) -> None:
        """Another connection claimed this client id (reason 0x8E)."""
        if self.v5:
            self._write(encode(Disconnect(rc.SESSION_TAKEN_OVER), MQTT_5))
        self.session = None
        self.close(send_will=False)

    def _arm_keep_alive(self, delay: float) -> None:
        """(Re)set the keep-alive / CONNECT deadline ``delay`` seconds from now."""
        self._cancel_keep_alive()
        self._ka_slot = self.wheel.add(self, delay)

    def _cancel_keep_alive(self) -> None:
        if self._ka_slot:
            self.wheel.discard(self, self._ka_slot)
            self._ka_slot = 0

    def wheel_due(self) -> None:
        """The keep-alive (or CONNECT) deadline passed (called by the timer wheel)."""
        self._ka_slot = 0
        if self.closed:
            return
        if self.session is None:
            log.info("connection from %s sent no CONNECT in time", self.peer)
            self.close(send_will=False)
            return
        limit = self.keep_alive * 1.5
        idle = self.loop.time() - self.last_rx
        if idle >= limit:
            log.info("client %s keep-alive timeout", self.client_id)
            self.disconnect(rc.KEEP_ALIVE_TIMEOUT, "keep alive timeout")
        else:
            self._ka_slot = self.wheel.add(self, limit - idle)

    def close(self, send_will: bool = True) -> None:
        """Flush pending output, close the transport, and tell the broker."""
        if self.closed:
            return
        self.closed = True
        self._flush()
        self._cancel_keep_alive()
        t: Any = self.transport
        if self._linger and getattr(t, "can_write_eof", lambda: False)():
            # Closing with the peer's unread bytes in our buffer resets the connection, and the
            # reset can reach a still-writing peer before our DISCONNECT is read: send FIN and
            # keep reading (and dropping) until the peer closes, at most LINGER seconds.
            t.write_eof()
            t.resume_reading()
            self.loop.call_later(LINGER, t.close)
        else:
            t.close()
        self.connection_lost(send_will)

    def connection_lost(self, send_will: bool = True) -> None:
        """The transport is gone (called by the listener, or by ``close``)."""
        self.closed = True
        self._cancel_keep_alive()
        session, self.session = self.session, None
        if self.watch is not None and self.client_id:
            self.watch.closed(self, self.client_id)
        if session is not None and session.link is self:
            self.broker.connection_lost(session, send_will)
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self)

    # -- bytes out -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._out and self.broker.flush_queue is WRITE_NOW and self._connack is None:
            # a lone packet's write with nothing before it: straight to the socket
            self.broker.stats.bytes_sent += len(data)
            self.transport.write(data)
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= FLUSH_AT:
            # One event-loop turn can read megabytes from a publisher (libuv reads up to 32
            # times per poll): hand them to the transport now so that its high-water mark
            # (pause_writing, backpressure) sees them, rather than after the turn.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            queue = self.broker.flush_queue
            if isinstance(queue, list):  # written at the end of the data_received running now
                queue.append(self)
            elif queue is None:
                self.loop.call_soon(self._flush)
            else:  # WRITE_NOW
                self._flush()

    def _flush(self) -> None:
        if self._connack is not None:  # nothing goes out before it (_connack_committed)
            return
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        self.broker.stats.bytes_sent += len(data)
        self.transport.write(data)
