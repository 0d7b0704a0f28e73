"""Upstream MQTT 3.1.1/5.0 client draining a queue into a cloud broker or cluster.

Built on the sans-I/O codec over an ``asyncio.Protocol`` (TCP or TLS, uvloop compatible).

Delivery contract with the :class:`UplinkSource` (the durable queue):

* ``fetch(upstream, limit)`` leases up to ``limit`` messages (oldest first) and returns them;
  leased messages are not returned again until acked or requeued.
* ``ack(upstream, ids)`` is called once the server acknowledged the messages (PUBACK, PUBCOMP;
  QoS 0 right after the write); acks are batched per read chunk.
* ``requeue(upstream, ids)`` returns leased messages: on connection loss (everything in
  flight, resent later as new PUBLISHes: at-least-once, duplicates only of the same id) and
  ``nack_delay`` seconds after a v5 PUBACK/PUBREC with a reason code >= 0x80.
* ``drop(upstream, ids, reason)`` removes leased messages that can never be sent (reason
  ``too_large``: above the MQTT 5 server's Maximum Packet Size); the rest keeps flowing.
* ``wait_for_data(upstream)`` returns a fresh awaitable (e.g. a coroutine) that completes when
  ``fetch`` may return something. The client cancels it on timeout or disconnect and also
  polls every ``poll_interval`` seconds, so a missed wake-up only costs latency.

Failover: an :class:`~.endpoint_policy.EndpointPolicy` picks the URL of each attempt (by
default the URLs in order); after a connection ends the next choice is tried at once, and a
:class:`Backoff` delay separates full rounds of failed attempts. A steering policy may also
end a healthy session (in-flight acks awaited briefly, then DISCONNECT; whatever is still in
flight is requeued as on any connection loss) to move to a better endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..mqtt.codec import PacketReader, encode, encode_publish
from ..mqtt.packets import (
    CONNACK,
    DISCONNECT,
    MQTT_5,
    MQTT_311,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    SubOptions,
    Subscribe,
)
from ..mqtt.properties import encode_properties, encode_varint
from .ackscan import leading_pubacks
from .backoff import Backoff
from .endpoint_policy import EndpointPolicy, FailureKind, OrderedPolicy
from .rate import TokenBucket

__all__ = ["Outgoing", "OutgoingMessage", "UplinkClient", "UplinkSource", "ConnectRefused"]

log = logging.getLogger(__name__)

_PINGREQ = b"\xc0\x00"
_ACK_ONLY = {PUBACK, PUBCOMP}
_RMQ_ID = b"\x26\x00\x06rmq-id"  # User Property "rmq-id" (its value follows)
MessageCallback = Callable[[str, bytes, int, dict[str, Any]], None]


@dataclass(slots=True)
class Outgoing:
    """One queued message; ``id`` is the queue's stable id."""

    id: int
    topic: str
    payload: bytes
    qos: int = 1
    properties: dict[str, Any] = field(default_factory=dict)
    retain: bool = False


class OutgoingMessage(Protocol):
    """What the client reads of a fetched message (an :class:`Outgoing` or the queue's own
    message type with the same fields)."""

    @property
    def id(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def properties(self) -> dict[str, Any]: ...
    @property
    def retain(self) -> bool: ...


class UplinkSource(Protocol):
    """What the client needs from the queue (see the module docstring for the contract)."""

    def fetch(self, upstream: str, limit: int) -> Sequence[OutgoingMessage]: ...

    def ack(self, upstream: str, ids: list[int]) -> None: ...

    def requeue(self, upstream: str, ids: list[int]) -> None: ...

    def drop(self, upstream: str, ids: list[int], reason: str) -> None: ...

    def wait_for_data(self, upstream: str) -> Awaitable[None]: ...


class ConnectRefused(Exception):
    """The server answered CONNECT with a failure reason code."""


@dataclass(slots=True, frozen=True)
class _Url:
    raw: str
    host: str
    port: int
    tls: bool


def _v5_properties(properties: dict[str, Any], rmq_id: bytes) -> bytes:
    """The message's property block with the ``rmq-id`` User Property appended (after any
    User Properties of its own, so their order is kept)."""
    tail = _RMQ_ID + len(rmq_id).to_bytes(2, "big") + rmq_id
    if properties:
        block = encode_properties(properties)
        n = 1
        while block[n - 1] & 0x80:  # skip the block's own length prefix
            n += 1
        tail = block[n:] + tail
    return encode_varint(len(tail)) + tail


def _parse_url(url: str) -> _Url:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"unsupported uplink URL {url!r} (mqtt://host:port or mqtts://...)")
    tls = parts.scheme == "mqtts"
    return _Url(url, parts.hostname, parts.port or (8883 if tls else 1883), tls)


@dataclass(slots=True)
class _Flight:
    qid: int
    qos: int
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    sent: float = 0.0  # time.monotonic() when written


class _Conn(asyncio.Protocol):
    """One transport; frames bytes into packets and hands them to the client."""

    def __init__(self, client: UplinkClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = PacketReader(version=client.version)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.active = False
        self.pending: list[Packet] = []
        self.last_rx = time.monotonic()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_rx = time.monotonic()
        acks: list[tuple[int, int]] = []
        if self.active and data[:1] == b"\x40" and not self.reader.buffered:
            acks, used = leading_pubacks(data, self.client.version == MQTT_5)
            if used:
                data = data[used:]
                if not data:
                    self.client._on_packets(self, [], acks)
                    return
        try:
            packets = self.reader.feed(data)
        except Exception as exc:
            log.warning("uplink %s: bad data from server: %s", self.client.name, exc)
            self.abort()
            return
        if not self.connack.done():
            if not packets:
                return
            first = packets.pop(0)
            if first.type != CONNACK:
                self.connack.set_exception(ConnectRefused(f"expected CONNACK, got {first}"))
                self.abort()
                return
            assert isinstance(first, Connack)
            self.connack.set_result(first)
        if self.active:
            self.client._on_packets(self, packets, acks)
        else:
            self.pending.extend(packets)
        if self.reader.error is not None:
            self.abort()

    def activate(self) -> None:
        """Start delivering packets to the client (buffered ones first)."""
        self.active = True
        if self.pending:
            packets, self.pending = self.pending, []
            self.client._on_packets(self, packets)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(exc or ConnectionError("connection closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class UplinkClient:
    """Drain ``source`` into the first reachable broker of ``urls`` (see module docstring)."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        client_id: str,
        source: UplinkSource,
        *,
        version: int = 5,
        username: str | None = None,
        password: str | None = None,
        keep_alive: int = 30,
        window: int = 100,
        tls: ssl.SSLContext | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: MessageCallback | None = None,
        gateway_id: str | None = None,
        session_expiry: int = 3600,
        nack_delay: float = 1.0,
        poll_interval: float = 1.0,
        stable_after: float = 1.0,
        rate_limit: float = 0.0,
        heartbeat_topic: str | None = None,
        heartbeat_interval: float = 30.0,
        policy: EndpointPolicy | None = None,
        ack_timeout: float = 10.0,
        steer_interval: float = 0.5,
    ) -> None:
        if version not in (MQTT_311, MQTT_5):
            raise ValueError("version must be 4 (3.1.1) or 5")
        if not urls:
            raise ValueError("at least one URL is required")
        if not 1 <= window <= 65535:
            raise ValueError("window must be 1..65535")
        self.name = name
        self.urls = [_parse_url(u) for u in urls]
        self._by_raw = {u.raw: u for u in self.urls}
        self.policy = policy if policy is not None else OrderedPolicy(list(self._by_raw))
        if set(getattr(self.policy, "endpoints", self._by_raw)) != set(self._by_raw):
            raise ValueError("the endpoint policy must cover exactly the client's URLs")
        self.ack_timeout = ack_timeout
        self.steer_interval = steer_interval
        self.client_id = client_id
        self.source = source
        self.version = version
        self.username = username
        self.password = password
        self.keep_alive = keep_alive
        self.window = window
        self.tls = tls
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.gateway_id = gateway_id if gateway_id is not None else client_id
        self.session_expiry = session_expiry
        self.nack_delay = nack_delay
        self.poll_interval = poll_interval
        self.stable_after = stable_after
        self.bucket = TokenBucket(rate_limit)
        self.heartbeat_topic = heartbeat_topic
        self.heartbeat_interval = heartbeat_interval
        #: wall-clock time the last heartbeat came back through the upstream, and its RTT
        self.last_heartbeat: float | None = None
        self.heartbeat_rtt_ms: float | None = None
        # observability
        self.connected = False
        self.current_url: str | None = None
        self.last_puback: float | None = None
        self.last_error: str | None = None
        self.sent = 0
        self.acked = 0
        self.reconnects = 0
        self.failovers = 0
        self.switches = 0  # sessions ended by the endpoint policy
        self.nacked = 0
        self.too_large = 0  # dropped: above the server's Maximum Packet Size
        self.received = 0
        self.max_inflight = 0
        self.limit = window
        self.suback_codes: list[int] = []
        # state
        self._conn: _Conn | None = None
        self._inflight: dict[int, _Flight] = {}
        self._carried: dict[int, int] = {}  # QoS 2 released before a disconnect: pid -> qid
        self._in_qos2: set[int] = set()
        self._sub_pids: set[int] = set()
        self._pid = 0
        self._max_qos = 2
        self._max_packet_size = 0
        self._room = asyncio.Event()
        self._stopping = False
        self._draining = False
        self._switching = False
        self._stop_evt: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None
        self._delayed: dict[asyncio.TimerHandle, list[int]] = {}

    # ------------------------------------------------------------------ observability

    @property
    def inflight(self) -> int:
        """QoS 1/2 PUBLISHes sent and not yet acknowledged."""
        return len(self._inflight)

    def status(self) -> dict[str, Any]:
        """A JSON-friendly snapshot of the client's state and counters."""
        return {
            "name": self.name,
            "connected": self.connected,
            "current_url": self.current_url,
            "version": self.version,
            "last_puback": self.last_puback,
            "last_error": self.last_error,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "limit": self.limit,
            "sent": self.sent,
            "acked": self.acked,
            "nacked": self.nacked,
            "too_large": self.too_large,
            "received": self.received,
            "reconnects": self.reconnects,
            "failovers": self.failovers,
            "switches": self.switches,
            "endpoint_policy": self.policy.snapshot(),
            "delayed_requeue": sum(len(v) for v in self._delayed.values()),
            "last_heartbeat": self.last_heartbeat,
            "heartbeat_rtt_ms": self.heartbeat_rtt_ms,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, drain and fail over until :meth:`stop`."""
        self._stopping = False
        self._draining = False
        self._stop_evt = asyncio.Event()
        self._finished = asyncio.Event()
        n = len(self.urls)
        failures = 0
        prev: str | None = None
        try:
            while not self._stopping:
                url = self._by_raw[self.policy.choose()]
                try:
                    conn, connack = await self._open(url)
                except (OSError, TimeoutError, ConnectRefused) as exc:
                    self.last_error = f"{url.raw}: {exc!r}"
                    log.info("uplink %s: connect to %s failed: %r", self.name, url.raw, exc)
                    self.policy.observe_failure(url.raw, FailureKind.CONNECT)
                    failures += 1
                else:
                    self.policy.connected(url.raw)
                    if prev is not None:
                        self.reconnects += 1
                        if prev != url.raw:
                            self.failovers += 1
                    prev = url.raw
                    started = time.monotonic()
                    await self._session(url, conn, connack)
                    if time.monotonic() - started >= self.stable_after:
                        self.backoff.reset()
                        failures = 0
                    else:
                        failures += 1
                if failures >= n and not self._stopping:
                    failures = 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_evt.wait(), self.backoff.next())
        finally:
            self._flush_delayed()
            self._finished.set()

    async def stop(self, drain_timeout: float = 0.0, timeout: float = 5.0) -> None:
        """Stop sending; wait up to ``drain_timeout`` s for in-flight acks; DISCONNECT.

        Whatever is still in flight (or waiting for a delayed requeue) is requeued.
        """
        self._draining = True
        self._room.set()
        deadline = time.monotonic() + drain_timeout
        while self._inflight and self._conn is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._stopping = True
        if self._stop_evt is not None:
            self._stop_evt.set()
        conn = self._conn
        if conn is not None:
            conn.write(encode(Disconnect(), self.version))
            if conn.transport is not None:
                conn.transport.close()
        if self._finished is not None:
            try:
                await asyncio.wait_for(self._finished.wait(), timeout)
            except TimeoutError:
                if self._conn is not None:
                    self._conn.abort()
        self._flush_delayed()

    # ------------------------------------------------------------------ connection

    async def _open(self, url: _Url) -> tuple[_Conn, Connack]:
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        if url.tls:
            ctx = self.tls or ssl.create_default_context()
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), url.host, url.port, ssl=ctx,
                    server_hostname=url.host if ctx else None,
                )
                props: dict[str, Any] = {}
                if self.version == MQTT_5 and self.session_expiry:
                    props["session_expiry_interval"] = self.session_expiry
                pw = self.password.encode() if self.password is not None else None
                conn.write(encode(Connect(
                    self.version, self.client_id, False, self.keep_alive, None,
                    self.username, pw, props,
                ), self.version))
                connack = await conn.connack
        except BaseException:
            if conn is not None:
                conn.abort()
            raise
        if connack.reason_code != 0:
            conn.abort()
            raise ConnectRefused(f"CONNACK reason 0x{connack.reason_code:02x}")
        return conn, connack

    async def _session(self, url: _Url, conn: _Conn, connack: Connack) -> None:
        props = connack.properties
        self.limit = min(self.window, int(props.get("receive_maximum", 65535)))
        self._max_qos = int(props.get("maximum_qos", 2))
        # MQTT 5: the server refuses (disconnects on) bigger packets; 0 = no limit
        self._max_packet_size = int(props.get("maximum_packet_size", 0))
        keep_alive = int(props.get("server_keep_alive", self.keep_alive))
        self._conn = conn
        self._switching = False
        self.connected = True
        self.current_url = url.raw
        self.last_error = None
        log.info("uplink %s: connected to %s (session present: %s)",
                 self.name, url.raw, connack.session_present)
        self._resume(conn, connack.session_present)
        subs = list(self.subscriptions)
        if self.heartbeat_topic:
            subs.append((self.heartbeat_topic, 0))
        if subs:
            pid = self._next_pid()
            self._sub_pids.add(pid)
            topics = [(t, SubOptions(q)) for t, q in subs]
            conn.write(encode(Subscribe(pid, topics), self.version))
        conn.activate()
        tasks = [asyncio.create_task(self._sender(conn))]
        if self.heartbeat_topic and self.heartbeat_interval > 0:
            tasks.append(asyncio.create_task(self._heartbeat(conn, self.heartbeat_topic)))
        if keep_alive:
            tasks.append(asyncio.create_task(self._keepalive(conn, keep_alive)))
        if self.policy.steers:
            tasks.append(asyncio.create_task(self._steer(conn, url.raw)))
        try:
            await conn.closed
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            conn.abort()
            self._conn = None
            self.connected = False
            if not self._stopping and not self._switching:
                self.policy.observe_failure(url.raw, FailureKind.LOST, len(self._inflight))
            self._lost()

    def _resume(self, conn: _Conn, session_present: bool) -> None:
        """Finish QoS 2 flows released before the last disconnect."""
        if not session_present:
            self._in_qos2.clear()
            if self._carried:  # the server had taken ownership (PUBREC) before it forgot us
                ids = list(self._carried.values())
                self._carried.clear()
                self._ack(ids)
            return
        for pid, qid in self._carried.items():
            self._inflight[pid] = _Flight(qid, 2, True, time.monotonic())
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

    async def _keepalive(self, conn: _Conn, keep_alive: int) -> None:
        tick = min(1.0, keep_alive / 4)
        next_ping = time.monotonic() + keep_alive
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - conn.last_rx > keep_alive * 1.5:
                self.last_error = f"no packet from server for {now - conn.last_rx:.1f} s"
                log.warning("uplink %s: %s, dropping the connection", self.name, self.last_error)
                conn.abort()
                return
            if now >= next_ping:
                conn.write(_PINGREQ)
                next_ping = now + keep_alive

    async def _steer(self, conn: _Conn, endpoint: str) -> None:
        """Report stalled acks to the endpoint policy; leave cleanly when it says so."""
        stalled = False
        while True:
            await asyncio.sleep(self.steer_interval)
            now = time.monotonic()
            oldest = min((f.sent for f in self._inflight.values()), default=now)
            if now - oldest > self.ack_timeout:
                if not stalled:
                    self.policy.observe_failure(
                        endpoint, FailureKind.ACK_TIMEOUT, len(self._inflight))
                stalled = True
            else:
                stalled = False
            if not self.policy.should_switch(endpoint):
                continue
            self.switches += 1
            log.info("uplink %s: endpoint policy %s leaves %s", self.name,
                     self.policy.name, endpoint)
            self._switching = True  # the sender stops; in-flight acks get a moment
            self._room.set()
            deadline = time.monotonic() + min(self.ack_timeout, 2.0)
            while self._inflight and time.monotonic() < deadline and not conn.closed.done():
                await asyncio.sleep(0.005)
            conn.write(encode(Disconnect(), self.version))
            if conn.transport is not None:
                conn.transport.close()
            return

    # ------------------------------------------------------------------ sending

    async def _heartbeat(self, conn: _Conn, topic: str) -> None:
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

    async def _sender(self, conn: _Conn) -> None:
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

    def _send_batch(self, conn: _Conn, batch: Sequence[OutgoingMessage]) -> None:
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
            props = _v5_properties(msg.properties, rid + str(msg.id).encode()) if v5 else None
            pid = self._next_pid() if qos else 0  # reserved below, once it is sent
            packet = encode_publish(
                msg.topic.encode(), msg.payload, qos, msg.retain, False, pid, props,
            )
            if max_size and len(packet) > max_size:
                too_large.append(msg.id)  # would be refused by the server on every attempt
                continue
            if qos:
                inflight[pid] = _Flight(msg.id, qos, False, now)
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
        self, conn: _Conn, packets: list[Packet], pubacks: Sequence[tuple[int, int]] = (),
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
                self.last_error = f"server DISCONNECT reason 0x{p.reason_code:02x}"
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

