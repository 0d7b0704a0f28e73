"""Upstream MQTT 3.1.1/5.0 client draining a queue into a cloud broker or cluster.

Built on the sans-I/O codec over an ``asyncio.Protocol`` (TCP or TLS, uvloop compatible).
The client is split by concern:

* :mod:`.source`: the queue interface it drains (:class:`UplinkSource`, delivery contract).
* :mod:`.transport`: URLs and the per-connection protocol (framing, CONNACK).
* :mod:`.message_flow`: the session's message flow (in-flight window, PUBLISH batches,
  acks and nacks, incoming messages, heartbeat), mixed into :class:`UplinkClient`.
* this module: the session lifecycle (connect, CONNACK terms, keep-alive, endpoint choice,
  reconnect/backoff, steering, stop).

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
from collections.abc import Sequence
from typing import Any

from ..mqtt.codec import encode, encode_publish
from ..mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    SubOptions,
    Subscribe,
    Will,
)
from ..telemetry import RepeatedLog
from .backoff import Backoff
from .endpoint_policy import EndpointPolicy, FailureKind, OrderedPolicy
from .message_flow import Flight, MessageCallback, MessageFlow
from .message_flow import v5_properties as _v5_properties  # noqa: F401 (tests use it)
from .rate import TokenBucket
from .source import Outgoing, OutgoingMessage, UplinkSource
from .transport import (
    ConnectRefused,
    UplinkProtocol,
    UplinkUrl,
    close_mqtt,
    open_mqtt,
    parse_url,
)

__all__ = ["Outgoing", "OutgoingMessage", "UplinkClient", "UplinkSource", "ConnectRefused"]

log = logging.getLogger(__name__)

_PINGREQ = b"\xc0\x00"


class UplinkClient(MessageFlow):
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
        will: Will | None = None,
    ) -> None:
        if version not in (MQTT_311, MQTT_5):
            raise ValueError("version must be 4 (3.1.1) or 5")
        if not urls:
            raise ValueError("at least one URL is required")
        if not 1 <= window <= 65535:
            raise ValueError("window must be 1..65535")
        self.name = name
        self._repeats = RepeatedLog(log)
        self.urls = [parse_url(u) for u in urls]
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
        #: the Will of every CONNECT (the fleet status's "offline"), None: no will
        self.will = will
        #: sessions begun (CONNACK accepted): a new one means retained state may be gone
        self.sessions = 0
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
        self._conn: UplinkProtocol | None = None
        self._inflight: dict[int, Flight] = {}
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

    def publish_now(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish at QoS 0 outside the queue (the fleet status, like the heartbeat);
        False when not connected."""
        conn = self._conn
        if conn is None or not self.connected:
            return False
        conn.write(encode_publish(topic.encode(), payload, 0, retain, False, 0,
                                  b"\x00" if self.version == MQTT_5 else None))
        return True

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
                    self._repeats(url.raw, logging.WARNING, "uplink %s: connect to %s failed: %r",
                                  self.name, url.raw, exc)
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
        close_mqtt(self._conn, self.version)
        if self._finished is not None:
            try:
                await asyncio.wait_for(self._finished.wait(), timeout)
            except TimeoutError:
                if self._conn is not None:
                    self._conn.abort()
        self._flush_delayed()

    # ------------------------------------------------------------------ connection

    async def _open(self, url: UplinkUrl) -> tuple[UplinkProtocol, Connack]:
        props: dict[str, Any] = {}
        if self.version == MQTT_5 and self.session_expiry:
            props["session_expiry_interval"] = self.session_expiry
        pw = self.password.encode() if self.password is not None else None
        return await open_mqtt(self, url, Connect(
            self.version, self.client_id, False, self.keep_alive, self.will, self.username, pw,
            props), tls=self.tls, timeout=self.connect_timeout)

    async def _session(self, url: UplinkUrl, conn: UplinkProtocol, connack: Connack) -> None:
        props = connack.properties
        self.limit = min(self.window, int(props.get("receive_maximum", 65535)))
        self._max_qos = int(props.get("maximum_qos", 2))
        # MQTT 5: the server refuses (disconnects on) bigger packets; 0 = no limit
        self._max_packet_size = int(props.get("maximum_packet_size", 0))
        keep_alive = int(props.get("server_keep_alive", self.keep_alive))
        self._conn = conn
        self._switching = False
        self.connected = True
        self.sessions += 1
        self.current_url = url.raw
        self.last_error = None
        # (the failed attempts before it, if any, are counted in this line)
        self._repeats.clear(url.raw, "uplink %s: %s reachable again", self.name, url.raw)
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
                why = conn.lost_with or self.last_error or "closed by the server"
                log.warning("uplink %s: lost the connection to %s (%s); %d in flight go "
                            "again", self.name, url.raw, why, len(self._inflight))
            self._lost()
    async def _keepalive(self, conn: UplinkProtocol, keep_alive: int) -> None:
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

    async def _steer(self, conn: UplinkProtocol, endpoint: str) -> None:
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
