"""The OTA session to the upstream cluster: a small MQTT 5 (or 3.1.1) client of its own.

Same URLs, credentials and TLS as the configured ``[[upstream]]``, its own client id
(``<gateway_id>-ota``) and a will: ``{prefix}/state/{gateway_id}`` = ``{"online": false}``
(retained; ``{"online": true}`` is published retained after each connect). Subscriptions are
dynamic (:meth:`OtaLink.subscribe` / :meth:`OtaLink.unsubscribe`) and restored after every
reconnect; every session starts clean, so retained manifests and chunks are delivered again.
QoS 1 publishes wait for their PUBACK and are sent again on the next connection if the
connection drops first (never more in flight than the server's Receive Maximum).
Reconnects follow a jittered :class:`~..uplink.backoff.Backoff`, forever, round-robin over
the URLs; repeated connection errors are logged once with a count.

The framing is :class:`~..uplink.transport.UplinkProtocol`'s (it needs only ``name``,
``version`` and ``_on_packets`` from its owner), the packets are :mod:`..mqtt.codec`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..mqtt import reasons as rc
from ..mqtt.codec import encode
from ..mqtt.packets import (
    DISCONNECT,
    MQTT_5,
    MQTT_311,
    PUBACK,
    PUBLISH,
    PUBREL,
    SUBACK,
    UNSUBACK,
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
    Unsuback,
    Unsubscribe,
    Will,
)
from ..telemetry import RepeatedLog
from ..uplink.backoff import Backoff
from ..uplink.transport import (
    ConnectRefused,
    UplinkProtocol,
    UplinkUrl,
    close_mqtt,
    open_mqtt,
    parse_url,
)

if TYPE_CHECKING:
    from ..config.forwarding import UpstreamSettings

__all__ = ["DEFAULT_PREFIX", "MessageHandler", "OtaLink", "PublishRefused", "state_topic"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "rapidmq/ota"
#: ``await handler(topic, payload, retained)`` for every PUBLISH received
MessageHandler = Callable[[str, bytes, bool], Awaitable[None]]
_PINGREQ = b"\xc0\x00"
_OFFLINE = json.dumps({"online": False}).encode()


class PublishRefused(Exception):
    """The server answered a QoS 1 PUBLISH with a failure reason code."""


def state_topic(prefix: str, gateway_id: str) -> str:
    """The will / online topic of a gateway (its per-component states live below it)."""
    return f"{prefix}/state/{gateway_id}"


@dataclass(slots=True, eq=False)
class _Out:
    """One QoS 1 PUBLISH until its PUBACK (``pid`` 0: not sent on this connection)."""

    topic: str
    payload: bytes
    retain: bool
    done: asyncio.Future[None]
    pid: int = 0


class OtaLink:
    """See the module docstring. ``run()`` until ``stop()``; ``online`` while connected."""

    def __init__(
        self,
        urls: Sequence[str],
        gateway_id: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        client_id: str | None = None,
        version: int = MQTT_5,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
        keep_alive: int = 30,
        connect_timeout: float = 5.0,
        reply_timeout: float = 10.0,
        backoff: Backoff | None = None,
        will: bool = True,
        on_message: MessageHandler | None = None,
        stable_after: float = 1.0,
        presence: dict[str, Any] | None = None,
        max_packet_size: int = 17 << 20,
    ) -> None:
        if version not in (MQTT_311, MQTT_5):
            raise ValueError("version must be 4 (3.1.1) or 5")
        if not urls:
            raise ValueError("at least one URL is required")
        self.urls: list[UplinkUrl] = [parse_url(u) for u in urls]
        self.gateway_id = gateway_id
        self.prefix = prefix.rstrip("/")
        self.client_id = client_id if client_id is not None else f"{gateway_id}-ota"
        self.name = self.client_id
        self.version = version
        self.username = username
        self.password = password
        self.tls = tls
        self.keep_alive = keep_alive
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.backoff = backoff or Backoff(initial=0.2, maximum=30.0)
        self.will = will
        #: the retained document announced after each connect (the will replaces it)
        self.presence = json.dumps({"online": True, **(presence or {})}).encode()
        self.stable_after = stable_after
        #: larger packets are refused (MQTT 5: announced, so the server drops them for us)
        self.max_packet_size = max_packet_size
        self._handlers: list[MessageHandler] = [on_message] if on_message else []
        self._repeats = RepeatedLog(log)
        # observability
        self.connects = 0
        self.connect_failures = 0
        self.received = 0
        self.last_error: str | None = None
        self.current_url: str | None = None
        # state
        self._subs: dict[str, int] = {}
        self._conn: UplinkProtocol | None = None
        self._online = asyncio.Event()
        self._replies: dict[int, asyncio.Future[Packet | None]] = {}
        self._outbox: dict[int, _Out] = {}  # seq -> QoS 1 publish not yet acked, in order
        self._seq = itertools.count()
        self._inflight: dict[int, _Out] = {}  # pid -> sent on this connection
        self._limit = 65535
        self._pid = 0
        self._incoming: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._stopping = False
        self._stop_evt = asyncio.Event()
        self._finished: asyncio.Event | None = None

    @classmethod
    def from_upstream(cls, up: UpstreamSettings, gateway_id: str, **kw: Any) -> OtaLink:
        """A link with the URLs, credentials, protocol and TLS of ``[[upstream]]`` ``up``."""
        kw.setdefault("backoff", Backoff(initial=0.2, maximum=up.reconnect_max_s))
        return cls(up.urls, gateway_id, version=up.protocol, username=up.username,
                   password=up.password, tls=up.client_tls(),
                   keep_alive=up.keep_alive, **kw)

    # ------------------------------------------------------------------ public API

    @property
    def online(self) -> bool:
        """Connected to a server (CONNACK received) right now."""
        return self._conn is not None

    async def wait_online(self, timeout: float | None = None) -> bool:
        """Wait until connected; False after ``timeout`` s."""
        try:
            await asyncio.wait_for(self._online.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def add_listener(self, handler: MessageHandler) -> None:
        """Also hand every received PUBLISH to ``handler``."""
        self._handlers.append(handler)

    def remove_listener(self, handler: MessageHandler) -> None:
        with contextlib.suppress(ValueError):
            self._handlers.remove(handler)

    @property
    def subscriptions(self) -> dict[str, int]:
        """Filter -> QoS of what the link keeps subscribed (restored on reconnect)."""
        return dict(self._subs)

    async def subscribe(self, topic_filter: str, qos: int = 1) -> int | None:
        """Subscribe now (if online, waiting for the SUBACK) and after every reconnect.

        Returns the SUBACK reason code, or None when offline (it is sent on connect)."""
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        self._subs[topic_filter] = qos
        conn = self._conn
        if conn is None:
            return None
        pid = self._next_pid()
        reply = self._expect(pid)
        conn.write(encode(Subscribe(pid, [(topic_filter, SubOptions(qos))]), self.version))
        packet = await self._await_reply(pid, reply)
        if not isinstance(packet, Suback):
            return None
        code = packet.reason_codes[0] if packet.reason_codes else 0x80
        if code >= 0x80:
            self._repeats(f"suback {topic_filter}", logging.WARNING,
                          "ota link: subscription to %s refused (0x%02x)", topic_filter, code)
        return code

    async def unsubscribe(self, topic_filter: str) -> None:
        """Forget ``topic_filter`` (and UNSUBSCRIBE now if online)."""
        if self._subs.pop(topic_filter, None) is None:
            return
        conn = self._conn
        if conn is None:
            return
        pid = self._next_pid()
        reply = self._expect(pid)
        conn.write(encode(Unsubscribe(pid, [topic_filter]), self.version))
        await self._await_reply(pid, reply)

    async def publish(self, topic: str, payload: bytes, qos: int = 1,
                      retain: bool = False) -> None:
        """Publish; QoS 1 returns after the PUBACK (resent across reconnects until then),
        QoS 0 after the write (waiting for a connection first).

        Raises :class:`PublishRefused` for a PUBACK with a failure reason code."""
        if qos == 0:
            await self._online.wait()
            assert self._conn is not None
            self._conn.write(encode(Publish(topic, payload, 0, retain), self.version))
            return
        if qos != 1:
            raise ValueError("the OTA link publishes at QoS 0 or 1")
        item = _Out(topic, payload, retain, asyncio.get_running_loop().create_future())
        seq = next(self._seq)
        self._outbox[seq] = item
        self._kick()
        try:
            await item.done
        finally:
            self._outbox.pop(seq, None)
            if item.pid and self._inflight.get(item.pid) is item:
                del self._inflight[item.pid]

    def status(self) -> dict[str, Any]:
        """A JSON-friendly snapshot."""
        return {"online": self.online, "url": self.current_url, "connects": self.connects,
                "connect_failures": self.connect_failures, "received": self.received,
                "subscriptions": len(self._subs), "unacked": len(self._outbox),
                "last_error": self.last_error}

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect and reconnect (with backoff, forever) until :meth:`stop`."""
        self._stopping = False
        self._stop_evt = asyncio.Event()
        self._finished = asyncio.Event()
        dispatcher = asyncio.create_task(self._dispatch())
        urls = itertools.cycle(self.urls)
        failures = 0
        try:
            while not self._stopping:
                url = next(urls)
                try:
                    conn, connack = await self._open(url)
                except (OSError, TimeoutError, ConnectRefused) as exc:
                    self.connect_failures += 1
                    self.last_error = f"{url.raw}: {exc!r}"
                    self._repeats("connect", logging.WARNING,
                                  "ota link %s: connect to %s failed: %r",
                                  self.client_id, url.raw, exc)
                    failures += 1
                else:
                    started = time.monotonic()
                    await self._session(url, conn, connack)
                    if time.monotonic() - started >= self.stable_after:
                        self.backoff.reset()
                        failures = 0
                    else:
                        failures += 1
                if failures >= len(self.urls) and not self._stopping:
                    failures = 0
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_evt.wait(), self.backoff.next())
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            self._finished.set()

    async def stop(self, timeout: float = 5.0) -> None:
        """Report offline (if the link has a will), DISCONNECT, end :meth:`run`."""
        conn = self._conn
        if conn is not None and self.will:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.publish(
                    state_topic(self.prefix, self.gateway_id), _OFFLINE, 1, True), timeout / 2)
        self._stopping = True
        self._stop_evt.set()
        close_mqtt(self._conn, self.version)
        if self._finished is not None:
            try:
                await asyncio.wait_for(self._finished.wait(), timeout)
            except TimeoutError:
                if self._conn is not None:
                    self._conn.abort()
        for item in self._outbox.values():
            if not item.done.done():
                item.done.set_exception(ConnectionError("OTA link stopped"))

    # ------------------------------------------------------------------ connection

    async def _open(self, url: UplinkUrl) -> tuple[UplinkProtocol, Connack]:
        props: dict[str, Any] = {}
        if self.version == MQTT_5:
            props["maximum_packet_size"] = self.max_packet_size
        will = None
        if self.will:
            will = Will(state_topic(self.prefix, self.gateway_id), _OFFLINE, 1, True)
        pw = self.password.encode() if self.password is not None else None
        return await open_mqtt(self, url, Connect(
            self.version, self.client_id, True, self.keep_alive, will, self.username, pw,
            props), tls=self.tls, timeout=self.connect_timeout,
            max_packet_size=self.max_packet_size)

    async def _session(self, url: UplinkUrl, conn: UplinkProtocol, connack: Connack) -> None:
        props = connack.properties
        self._limit = int(props.get("receive_maximum", 65535))
        keep_alive = int(props.get("server_keep_alive", self.keep_alive))
        self._conn = conn
        self.current_url = url.raw
        self.connects += 1
        self.last_error = None
        if self._repeats.active("connect"):
            self._repeats.clear("connect", "ota link %s: connected to %s",
                                self.client_id, url.raw)
        else:
            log.info("ota link %s: connected to %s", self.client_id, url.raw)
        if self._subs:
            pid = self._next_pid()
            self._expect(pid)
            topics = [(t, SubOptions(q)) for t, q in self._subs.items()]
            conn.write(encode(Subscribe(pid, topics), self.version))
        conn.activate()
        self._online.set()
        self._kick()
        tasks: list[asyncio.Task[Any]] = []
        if self.will:
            tasks.append(asyncio.create_task(self._announce()))
        if keep_alive:
            tasks.append(asyncio.create_task(self._keepalive(conn, keep_alive)))
        try:
            await conn.closed
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            conn.abort()
            self._conn = None
            self._online.clear()
            self._inflight.clear()
            for item in self._outbox.values():
                item.pid = 0
            for fut in self._replies.values():
                if not fut.done():
                    fut.set_result(None)
            self._replies.clear()
            if not self._stopping:
                self._repeats("lost", logging.WARNING, "ota link %s: connection to %s lost",
                              self.client_id, url.raw)

    async def _announce(self) -> None:
        with contextlib.suppress(ConnectionError, PublishRefused):
            await self.publish(state_topic(self.prefix, self.gateway_id), self.presence, 1,
                               True)

    async def _keepalive(self, conn: UplinkProtocol, keep_alive: int) -> None:
        tick = min(1.0, keep_alive / 4)
        next_ping = time.monotonic() + keep_alive
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - conn.last_rx > keep_alive * 1.5:
                self.last_error = f"no packet from server for {now - conn.last_rx:.1f} s"
                conn.abort()
                return
            if now >= next_ping:
                conn.write(_PINGREQ)
                next_ping = now + keep_alive

    # ------------------------------------------------------------------ packets

    def _next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self._inflight and self._pid not in self._replies:
                return self._pid
        raise RuntimeError("no free packet identifier")

    def _expect(self, pid: int) -> asyncio.Future[Packet | None]:
        fut: asyncio.Future[Packet | None] = asyncio.get_running_loop().create_future()
        self._replies[pid] = fut
        return fut

    async def _await_reply(self, pid: int, fut: asyncio.Future[Packet | None]) -> Packet | None:
        try:
            return await asyncio.wait_for(fut, self.reply_timeout)
        except TimeoutError:
            self.last_error = f"no reply to packet {pid} within {self.reply_timeout} s"
            if self._conn is not None:
                self._conn.abort()  # a server that stops answering: reconnect
            return None
        finally:
            if self._replies.get(pid) is fut:
                del self._replies[pid]

    def _kick(self) -> None:
        """Send queued QoS 1 publishes while the server's Receive Maximum allows."""
        conn = self._conn
        if conn is None:
            return
        out: list[bytes] = []
        for item in self._outbox.values():
            if len(self._inflight) >= self._limit:
                break
            if item.pid or item.done.done():
                continue
            item.pid = self._next_pid()
            self._inflight[item.pid] = item
            out.append(encode(Publish(item.topic, item.payload, 1, item.retain,
                                      packet_id=item.pid), self.version))
        if out:
            conn.write(b"".join(out))

    def _on_packets(self, conn: UplinkProtocol, packets: list[Packet],
                    pubacks: Sequence[tuple[int, int]] = ()) -> None:
        if conn is not self._conn:
            return
        acked = [Puback(pid, code) for pid, code in pubacks]
        out: list[bytes] = []
        for p in itertools.chain(acked, packets):
            t = p.type
            if t == PUBLISH:
                assert isinstance(p, Publish)
                if p.qos == 1:
                    out.append(encode(Puback(p.packet_id), self.version))
                elif p.qos == 2:
                    out.append(encode(Pubrec(p.packet_id), self.version))
                self.received += 1
                self._incoming.put_nowait((p.topic, p.payload, p.retain))
            elif t == PUBACK:
                assert isinstance(p, Puback)
                item = self._inflight.pop(p.packet_id, None)
                if item is not None and not item.done.done():
                    if p.reason_code >= 0x80:
                        item.done.set_exception(PublishRefused(
                            f"PUBLISH to {item.topic} refused: {rc.describe(p.reason_code)}"))
                    else:
                        item.done.set_result(None)
            elif t == PUBREL:
                assert isinstance(p, Pubrel)
                out.append(encode(Pubcomp(p.packet_id), self.version))
            elif t in (SUBACK, UNSUBACK):
                assert isinstance(p, (Suback, Unsuback))
                fut = self._replies.get(p.packet_id)
                if fut is not None and not fut.done():
                    fut.set_result(p)
                elif isinstance(p, Suback) and any(c >= 0x80 for c in p.reason_codes):
                    log.warning("ota link %s: restored subscriptions refused: %s",
                                self.client_id, p.reason_codes)
            elif t == DISCONNECT:
                assert isinstance(p, Disconnect)
                self.last_error = f"server DISCONNECT: {rc.describe(p.reason_code)}"
                conn.abort()
        if out:
            conn.write(b"".join(out))
        if self._outbox:
            self._kick()

    async def _dispatch(self) -> None:
        while True:
            topic, payload, retained = await self._incoming.get()
            for handler in list(self._handlers):
                try:
                    await handler(topic, payload, retained)
                except Exception as exc:
                    self._repeats(f"handler {getattr(handler, '__qualname__', handler)}",
                                  logging.ERROR, "ota link %s: message handler failed on %s: %r",
                                  self.client_id, topic, exc)
