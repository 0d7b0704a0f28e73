"""MQTT listeners: TCP, TLS and WebSocket (subprotocol ``mqtt``) around ClientConnection."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from ..broker.connection import ClientConnection
from ..config.mqtt import ListenerSettings, TlsSettings
from ..mqtt import reasons as rc
from ..mqtt.codec import encode
from ..mqtt.packets import MQTT_5, Disconnect

log = logging.getLogger(__name__)

ConnectionFactory = Callable[[Any, str], ClientConnection]
WRITE_HIGH_WATER = 1024 * 1024  # above this, publishers to the client are paused


@dataclass
class ConnectionRegistry:
    """Live connections, connection limits and the per-address connect rate."""

    connect_rate: float = 0.0
    connections: set[ClientConnection] = field(default_factory=set)
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def admit(self, host: str) -> bool:
        """Token bucket per source address: False when it connects too fast."""
        if not self.connect_rate:
            return True
        now = time.monotonic()
        burst = max(1.0, self.connect_rate)
        tokens, last = self._buckets.get(host, (burst, now))
        tokens = min(burst, tokens + (now - last) * self.connect_rate)
        if tokens < 1:
            self._buckets[host] = (tokens, now)
            return False
        self._buckets[host] = (tokens - 1, now)
        if len(self._buckets) > 100_000:
            self._buckets.clear()
        return True

    def shutdown(self) -> None:
        """Tell every client the server is going away, then close them."""
        for conn in list(self.connections):
            if conn.v5 and conn.session is not None:
                conn._write(encode(Disconnect(rc.SERVER_SHUTTING_DOWN), MQTT_5))
            conn.close(send_will=False)


class MqttStreamProtocol(asyncio.Protocol):
    """asyncio protocol for MQTT over TCP or TLS."""

    def __init__(self, factory: ConnectionFactory, registry: ConnectionRegistry,
                 listener: str = "") -> None:
        self.factory = factory
        self.registry = registry
        self.listener = listener
        self.conn: ClientConnection | None = None

    def connection_made(self, transport: Any) -> None:  # uvloop's is no asyncio.Transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        host = str(peer[0])
        admitted = self.registry.admit(host)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        conn = self.factory(transport, f"{host}:{peer[1]}")
        conn.listener = self.listener
        if not admitted:  # CONNACK 0x9F (3.1.1: 3, server unavailable), then closed
            log.warning("connection rate from %s exceeded; refusing", host)
            conn.refuse_connect(rc.CONNECTION_RATE_EXCEEDED)
        conn.on_close = self.registry.connections.discard
        self.registry.connections.add(conn)
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.data_received(data)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.connection_lost(send_will=True)
            self.conn = None


class WebSocketTransport:
    """Adapts a websockets connection to the Transport interface of ClientConnection."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._pending: list[bytes] = []
        self._size = 0
        self._wake = asyncio.Event()
        self._readable = asyncio.Event()
        self._readable.set()
        self._closing = False
        self.writer = asyncio.get_running_loop().create_task(self._write_loop())

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    def get_write_buffer_size(self) -> int:
        return self._size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The TLS connection's (``peercert``: the client certificate of wss://)."""
        transport = getattr(self.ws, "transport", None)
        return default if transport is None else transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._pending:
                    data = b"".join(self._pending)
                    self._pending.clear()
                    await self.ws.send(data)
                    self._size = 0
                if self._closing and not self._pending:
                    await self.ws.close()
                    return
        except Exception:  # connection already gone
            return


async def serve_websocket(
    host: str, port: int, path: str, factory: ConnectionFactory, registry: ConnectionRegistry,
    ssl_context: ssl.SSLContext | None, listener: str = "",
) -> Any:
    """Start a WebSocket listener; MQTT packets travel in binary frames."""
    from websockets.asyncio.server import serve

    async def handler(ws: Any) -> None:
        request_path = getattr(getattr(ws, "request", None), "path", path)
        if request_path.split("?")[0] != path:
            await ws.close(1008, "unknown path")
            return
        peer = ws.remote_address or ("?", 0)
        admitted = registry.admit(str(peer[0]))
        transport = WebSocketTransport(ws)
        conn = factory(transport, f"{peer[0]}:{peer[1]}")
        conn.listener = listener
        if not admitted:  # refused with a CONNACK, as over TCP
            log.warning("connection rate from %s exceeded; refusing", peer[0])
            conn.refuse_connect(rc.CONNECTION_RATE_EXCEEDED)
        conn.on_close = registry.connections.discard
        registry.connections.add(conn)
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    conn.disconnect(rc.PROTOCOL_ERROR, "text frame")
                    break
                await transport._readable.wait()
                conn.data_received(frame)
                if conn.closed:
                    break
        except Exception as exc:  # network errors end the connection like a TCP reset
            log.debug("websocket %s: %s", peer, exc)
        finally:
            conn.connection_lost(send_will=True)
            transport.close()
            await asyncio.wait({transport.writer}, timeout=5)

    def check_path(connection: Any, request: Any) -> Any:
        # refuse the upgrade itself (HTTP 404) rather than accept and close
        if request.path.split("?")[0] != path:
            return connection.respond(HTTPStatus.NOT_FOUND, "no MQTT endpoint here\n")
        return None

    return await serve(
        handler, host, port, subprotocols=["mqtt"], ssl=ssl_context,  # type: ignore[list-item]
        max_size=None, compression=None, process_request=check_path,
    )


def openssl_offers_hybrid_mlkem() -> bool:
    """True when the OpenSSL linked into Python negotiates X25519MLKEM768 by default.

    OpenSSL >= 3.5 puts the hybrid group first in its default TLS 1.3 group list, so
    the gateway leaves the groups alone (Python < 3.15 cannot set them anyway) and a
    post-quantum key exchange happens whenever the client offers it.
    """
    return ssl.OPENSSL_VERSION_INFO >= (3, 5)


def make_ssl_context(cert: str, key: str, client_ca: str | None, require: bool) -> ssl.SSLContext:
    """A server TLS context: TLS 1.2+ (1.3 preferred), optional client certificates.

    A client certificate verified against ``client_ca`` names the client: its subject CN
    (:func:`~rapidmq_edge.broker.client_certificate.certificate_cn`) is the ``${cert_cn}``
    of role rules and, with ``[auth] use_cn_as_username``, its user name.

    Key exchange groups are OpenSSL's defaults: hybrid X25519MLKEM768 where the linked
    OpenSSL offers it (see :func:`openssl_offers_hybrid_mlkem`), classical otherwise.
    """
    if not openssl_offers_hybrid_mlkem():
        log.warning(
            "TLS: %s has no ML-KEM groups; key exchange is classical (X25519). "
            "Hybrid X25519MLKEM768 needs Python linked against OpenSSL >= 3.5",
            ssl.OPENSSL_VERSION,
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
    return ctx


async def serve_mqtt(
    listeners: Sequence[ListenerSettings], tls: TlsSettings | None, factory: ConnectionFactory,
    registry: ConnectionRegistry,
) -> tuple[list[Any], list[str]]:
    """Bind every ``[mqtt] listen`` URL (TCP, TLS, WebSocket); return the servers and the
    URLs they are bound to (a port 0 resolved)."""
    loop = asyncio.get_running_loop()
    servers: list[Any] = []
    bound: list[str] = []
    for i, lst in enumerate(listeners):
        ctx = None
        if lst.is_tls:
            assert tls is not None  # validated: a tls:// or wss:// listener needs [mqtt.tls]
            ctx = make_ssl_context(str(tls.cert), str(tls.key),
                                   str(tls.client_ca) if tls.client_ca else None,
                                   tls.require_client_cert)
        try:
            if lst.is_websocket:
                server = await serve_websocket(lst.host, lst.port, lst.path, factory, registry,
                                               ctx, lst.url)
            else:
                server = await loop.create_server(
                    lambda lst=lst: MqttStreamProtocol(factory, registry, lst.url),
                    lst.host, lst.port, ssl=ctx, reuse_address=True, backlog=1024,
                )
        except OSError as exc:
            for started in servers:
                started.close()
            raise OSError(f"mqtt.listen[{i}] {lst.url}: {exc.strerror or exc}") from exc
        servers.append(server)
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            url = f"{lst.scheme}://{host}:{port}{lst.path}"
            bound.append(url)
            log.info("listening on %s", url)
    return servers, bound
