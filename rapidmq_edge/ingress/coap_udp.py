"""The UDP socket of a CoAP listener, shared by a fast path and aiocoap.

Why: aiocoap's message layer costs ~250 µs of CPU per request on this machine (a trivial
confirmable PUT resource tops out near 3,900 requests/s at 100 % of a core), below the
gateway's 5,000 confirmable publishes/s target before any broker work. Publishing is one
request type with a fixed shape, so it gets a path of its own; everything else (Observe,
block-wise, discovery, OSCORE, conditional requests, topic configuration) stays aiocoap's.

How: :class:`UdpEndpoint` is the ``asyncio.DatagramProtocol`` owning the socket. Each
datagram is parsed once with :mod:`rapidmq_edge.coap.codec`:

- malformed: a RST when it is a readable CON (RFC 7252 §4.2), else dropped;
- offered to the ``fast`` handler, which returns True when it took the message;
- otherwise fed to aiocoap as if aiocoap's own ``simplesocketserver`` transport had read
  it: :class:`AiocoapBridge` is a ``GenericMessageInterface`` whose remotes send through
  this socket, so aiocoap's responses, notifications and block-wise exchanges go out of the
  same port (one CoAP endpoint to the client).

The bridge is attached with ``Context._append_tokenmanaged_messagemanaged_transport``, the
hook aiocoap's own transports use (aiocoap 0.4.x). When bound to an any-address (``::``,
``0.0.0.0``) the kernel picks the source address of replies by routing (single-homed hosts).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiocoap.transports.generic_udp import GenericMessageInterface
from aiocoap.transports.simplesocketserver import _Address

from ..coap import codec

log = logging.getLogger(__name__)

#: (message, remote socket address) -> True when the fast path handled it
FastHandler = Callable[[codec.Message, Any], bool]


class UdpEndpoint(asyncio.DatagramProtocol):
    """One bound UDP socket: parse, fast path, or hand over to aiocoap."""

    def __init__(self, hostinfo_local: str) -> None:
        self.hostinfo_local = hostinfo_local  # read by aiocoap's remote objects
        self.fast: FastHandler | None = None
        self.bridge: Any = None  # AiocoapBridge, set once the aiocoap context exists
        self._transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.malformed = 0
        self.fast_count = 0
        self.slow_count = 0

    # -- asyncio ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            msg = codec.parse(data)
        except codec.MessageFormatError as exc:
            self.malformed += 1
            log.debug("malformed CoAP datagram from %s: %s", addr, exc)
            rst = codec.reset_for(data)
            if rst is not None and self._transport is not None:
                self._transport.sendto(rst, addr)
            return
        fast = self.fast
        if fast is not None and fast(msg, addr):
            self.fast_count += 1
            return
        self.slow_count += 1
        bridge = self.bridge
        if bridge is None:
            return
        try:
            bridge.received(addr, data)
        except Exception as exc:  # noqa: BLE001 - e.g. aiocoap on a non-UTF-8 Uri-Host
            self.malformed += 1
            log.debug("CoAP datagram from %s not accepted by aiocoap: %r", addr, exc)
            if msg.mtype == codec.CON and self._transport is not None:
                self._transport.sendto(codec.serialize(
                    codec.Message(codec.RST, codec.EMPTY, msg.mid)), addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors cannot be mapped to a remote on an unconnected socket
        log.debug("CoAP socket error ignored: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    # -- used by the fast path and by aiocoap's remotes --------------------------------

    def sendto(self, data: bytes, addr: Any) -> None:
        """Send one datagram (dropped once the socket is closed)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data, addr)

    async def shutdown(self) -> None:
        """Close the socket (aiocoap calls this when its context shuts down)."""
        if self._transport is not None:
            self._transport.close()
            await asyncio.wait_for(asyncio.shield(self.closed), 5)

    async def connect(self, sockaddr: tuple[str, int]) -> Any:
        """A remote for an address aiocoap wants to send a new request to."""
        from aiocoap import error

        assert self._transport is not None
        family = self._transport.get_extra_info("socket").family
        infos = await asyncio.get_running_loop().getaddrinfo(*sockaddr, family=family)
        if not infos:
            raise error.NetworkError(f"no address found for {sockaddr[0]}")
        return _Address(self, infos[0][4])


def bind_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to (host, port); ``::`` is dual-stack."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # bursts of thousands of requests must not overflow the default 208 KiB
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def open_endpoint(host: str, port: int, site: Any) -> tuple[UdpEndpoint, Any]:
    """Bind (host, port) and serve ``site`` with aiocoap through it.

    Returns the endpoint (set its ``fast`` handler to take messages first) and the aiocoap
    ``Context`` (shut it down to close the socket).
    """
    import aiocoap

    loop = asyncio.get_running_loop()
    sock = bind_socket(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    _, endpoint = await loop.create_datagram_endpoint(
        lambda: UdpEndpoint(f"{shown}:{bound[1]}"), sock=sock)
    ctx = aiocoap.Context(loop=loop, serversite=site, loggername="coap-server")

    async def attach(mman: Any) -> Any:
        bridge = AiocoapBridge(mman, ctx.log, loop)
        bridge._pool = endpoint
        endpoint.bridge = bridge
        return bridge

    await ctx._append_tokenmanaged_messagemanaged_transport(attach)
    return endpoint, ctx


class AiocoapBridge(GenericMessageInterface):  # type: ignore[misc]
    """aiocoap's message interface over a :class:`UdpEndpoint`."""

    def received(self, addr: Any, data: bytes) -> None:
        """Feed one datagram to aiocoap's message manager."""
        self._received_datagram(_Address(self._pool, addr), data)

    async def recognize_remote(self, remote: Any) -> bool:
        return getattr(remote, "serversocket", None) is self._pool
