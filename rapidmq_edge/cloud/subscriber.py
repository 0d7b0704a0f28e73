"""A small asyncio MQTT 5 / 3.1.1 subscriber on the project's sans-I/O codec (rapidmq_edge.mqtt).

Connects, subscribes (shared ``$share/<group>/...`` filters allowed) and either hands every
PUBLISH to a callback and acknowledges QoS 1 after the callback returned, or (no callback)
queues :class:`Delivery` items that the owner acknowledges with :meth:`Subscriber.ack` once
they are safe — in the order they arrived, as MQTT requires. ``session_expiry`` > 0 keeps a
persistent session (MQTT 5 Session Expiry, 3.1.1 clean session off): what was not
acknowledged is redelivered after a reconnect. Reconnects with a short backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..mqtt.codec import PacketReader, encode
from ..mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Pingreq,
    Puback,
    Publish,
    Suback,
    SubOptions,
    Subscribe,
)
from ..telemetry import RepeatedLog

__all__ = ["Delivery", "Subscriber"]

log = logging.getLogger(__name__)

OnPublish = Callable[[str, bytes, dict[str, str]], None]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received PUBLISH waiting for :meth:`Subscriber.ack`."""

    topic: str
    payload: bytes
    props: dict[str, str]
    qos: int
    packet_id: int | None
    conn: int  # connection generation: an ack for an older connection is dropped
    handle: Any = None  # the source's own ack handle (a JetStream message)


class Inbox:
    """Deliveries received and not taken yet (both sources: the MQTT subscriber and the
    JetStream pull consumer)."""

    def __init__(self) -> None:
        self.items: list[Delivery] = []
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self.items)

    def put(self, items: Sequence[Delivery]) -> None:
        """Queue ``items`` and wake a waiting :meth:`take`."""
        if items:
            self.items.extend(items)
            self._arrived.set()

    def drop(self) -> None:
        """Forget what is queued (the connection that brought it is gone: not acknowledged,
        it comes again)."""
        self.items = []

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` deliveries (waits at most ``timeout`` s for the first)."""
        if not self.items:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        out, self.items = self.items[:limit], self.items[limit:]
        return out


def _user_props(props: dict[str, object]) -> dict[str, str]:
    pairs = props.get("user_property") or []
    return {str(k): str(v) for k, v in pairs}  # type: ignore[attr-defined]


class Subscriber:
    """One MQTT 5 connection subscribed to ``filters`` (each ``(filter, qos)``)."""

    def __init__(
        self, url: str, client_id: str, filters: Sequence[tuple[str, int]],
        on_publish: OnPublish | None,
        *, username: str | None = None, password: str | None = None, keep_alive: int = 30,
        version: int = MQTT_5, session_expiry: int = 0, receive_maximum: int = 1024,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError(f"upstream URL must look like mqtt://host:port, got {url!r}")
        self.host, self.port = parts.hostname, parts.port or 1883
        self.client_id = client_id
        self.filters = list(filters)
        self.on_publish = on_publish
        self.username, self.password = username, password
        self.keep_alive = keep_alive
        self.version = version
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.subscribed = asyncio.Event()
        self.received = 0
        self.session_present = False
        self._stop = asyncio.Event()
        self._inbox = Inbox()
        self._conn = 0
        self._writer: asyncio.StreamWriter | None = None
        self._repeats = RepeatedLog(log)  # a long outage: one line, then counts

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` queued deliveries (waits at most ``timeout`` s for the first)."""
        return await self._inbox.take(limit, timeout)

    def ack(self, items: Sequence[Delivery]) -> int:
        """PUBACK the QoS 1 ``items`` (in the given order) that came on the live connection;
        returns how many were sent. Older ones are redelivered by the broker (session)."""
        w = self._writer
        acks = [encode(Puback(d.packet_id), self.version) for d in items
                if d.qos and d.packet_id is not None and d.conn == self._conn]
        if w is None or not acks or w.is_closing():
            return 0
        w.write(b"".join(acks))
        return len(acks)

    async def acknowledge(self, items: Sequence[Delivery]) -> int:
        """:meth:`ack` behind the interface every ingest source has
        (:class:`~rapidmq_edge.cloud.jetstream_source.JetStreamSource`)."""
        return self.ack(items)

    async def run(self) -> None:
        """Connect and receive until :meth:`stop`; reconnect after a lost connection."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                await self._session()
                delay = 0.2
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                self._repeats("session", logging.WARNING, "upstream %s:%d: %s; reconnecting",
                              self.host, self.port, exc)
            except Exception:  # a bug must not end the consumer silently
                log.exception("upstream %s:%d: unexpected error; reconnecting",
                              self.host, self.port)
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        v = self.version
        codec = PacketReader(version=v)
        self._conn += 1
        self._inbox.drop()  # not acknowledged on the old connection: the broker redelivers
        conn = self._conn
        props: dict[str, object] = {}
        if v == MQTT_5:
            props["receive_maximum"] = self.receive_maximum
            if self.session_expiry:
                props["session_expiry_interval"] = self.session_expiry
        try:
            writer.write(encode(Connect(
                v, self.client_id, not self.session_expiry, self.keep_alive, None,
                self.username, self.password.encode() if self.password is not None else None,
                props,  # type: ignore[arg-type]
            ), v))
            writer.write(encode(Subscribe(
                1, [(f, SubOptions(qos=q)) for f, q in self.filters]), v))
            await writer.drain()
            self._writer = writer
            ping = asyncio.get_running_loop().create_task(self._ping(writer))
            stop = asyncio.get_running_loop().create_task(self._stop.wait())
            try:
                while True:
                    read = asyncio.ensure_future(reader.read(65536))
                    done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if stop in done:
                        read.cancel()
                        return
                    data = read.result()
                    if not data:
                        raise ConnectionError("connection closed by the upstream")
                    acks = []
                    for p in codec.feed(data):
                        if isinstance(p, Publish):
                            self.received += 1
                            user = _user_props(p.properties) if v == MQTT_5 else {}
                            if self.on_publish is None:
                                self._inbox.put([Delivery(p.topic, p.payload, user, p.qos,
                                                          p.packet_id, conn)])
                                continue
                            self.on_publish(p.topic, p.payload, user)
                            if p.qos:
                                acks.append(encode(Puback(p.packet_id), v))
                        elif isinstance(p, Connack) and p.reason_code:
                            raise ConnectionError(f"CONNACK reason code {p.reason_code:#x}")
                        elif isinstance(p, Connack):
                            self.session_present = p.session_present
                        elif isinstance(p, Suback):
                            bad = [c for c in p.reason_codes if c >= 0x80]
                            if bad:
                                raise ConnectionError(f"SUBACK refused: {bad}")
                            self.subscribed.set()
                            self._repeats.clear("session", "upstream %s:%d: subscribed again",
                                                self.host, self.port)
                    if acks:
                        writer.write(b"".join(acks))
            finally:
                ping.cancel()
                stop.cancel()
        finally:
            self.subscribed.clear()
            self._writer = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(max(1, self.keep_alive // 2))
            writer.write(encode(Pingreq(), self.version))
