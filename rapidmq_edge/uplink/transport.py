"""The uplink's network side: broker URLs and the ``asyncio.Protocol`` of one connection.

:class:`UplinkProtocol` frames received bytes into packets (PUBACK runs at the front of a
read are taken off by :func:`~.ackscan.leading_pubacks` first), settles the CONNACK future
and hands everything after it to the owning :class:`~.client.UplinkClient`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..mqtt.codec import PacketReader, encode
from ..mqtt.packets import CONNACK, MQTT_5, Connack, Connect, Disconnect, Packet
from .ackscan import leading_pubacks

if TYPE_CHECKING:
    from .client import UplinkClient

__all__ = ["ConnectRefused", "UplinkProtocol", "UplinkUrl", "close_mqtt", "open_mqtt",
           "parse_url"]

log = logging.getLogger(__name__)


class ConnectRefused(Exception):
    """The server answered CONNECT with a failure reason code."""


@dataclass(slots=True, frozen=True)
class UplinkUrl:
    """A parsed ``mqtt://`` / ``mqtts://`` URL."""

    raw: str
    host: str
    port: int
    tls: bool


def parse_url(url: str) -> UplinkUrl:
    """Parse an uplink URL; ValueError for anything but ``mqtt://`` and ``mqtts://``."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"unsupported uplink URL {url!r} (mqtt://host:port or mqtts://...)")
    tls = parts.scheme == "mqtts"
    return UplinkUrl(url, parts.hostname, parts.port or (8883 if tls else 1883), tls)


class UplinkProtocol(asyncio.Protocol):
    """One transport; frames bytes into packets and hands them to the client."""

    def __init__(self, client: UplinkClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = PacketReader(version=client.version)
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        #: the error the connection was lost with (None: closed cleanly, or still open)
        self.lost_with: Exception | None = None
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
        self.lost_with = exc
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


async def open_mqtt(owner: Any, url: UplinkUrl, connect: Connect, *,
                    tls: ssl.SSLContext | None, timeout: float,
                    max_packet_size: int = 0) -> tuple[UplinkProtocol, Connack]:
    """Connect to ``url`` (``mqtts``: ``tls`` or the default context), send ``connect`` and
    wait for the CONNACK, all within ``timeout``; ConnectRefused when the server refuses.
    ``owner`` gets the packets after the CONNACK (``name``, ``version``, ``_on_packets``).
    The connection is aborted on any failure."""
    loop = asyncio.get_running_loop()
    ctx = (tls or ssl.create_default_context()) if url.tls else None
    conn: UplinkProtocol | None = None
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: UplinkProtocol(owner), url.host, url.port, ssl=ctx,
                server_hostname=url.host if ctx else None)
            if max_packet_size:
                conn.reader.max_packet_size = max_packet_size
            conn.write(encode(connect, connect.protocol_level))
            connack = await conn.connack
    except BaseException:
        if conn is not None:
            conn.abort()
        raise
    if connack.reason_code != 0:
        conn.abort()
        raise ConnectRefused(f"CONNACK reason 0x{connack.reason_code:02x}")
    return conn, connack


def close_mqtt(conn: UplinkProtocol | None, version: int) -> None:
    """A clean end: DISCONNECT, then close the transport (no-op without a connection)."""
    if conn is not None:
        conn.write(encode(Disconnect(), version))
        if conn.transport is not None:
            conn.transport.close()
