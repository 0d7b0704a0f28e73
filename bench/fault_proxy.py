"""A TCP proxy that degrades a link on demand: delay, jitter, connection resets, refusals.

Used by ``bench/routing.py`` and the endpoint-policy integration test to put a real broker
behind a bad network path. Delay and jitter apply to the server → client direction (so a
PUBACK comes back ``delay + U(0, jitter)`` seconds late; byte order is kept); a live
connection is reset (RST) with probability ``reset_rate * dt`` in every ``dt`` tick; a new
connection is refused (closed at once) with probability ``refuse``. Change the faults at
any time with :meth:`FaultProxy.set`; they apply to live connections too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from dataclasses import dataclass

__all__ = ["FaultProxy", "Faults"]

_TICK = 0.1


@dataclass(frozen=True, slots=True)
class Faults:
    """What the proxy does to the link (all zero: a transparent proxy)."""

    delay: float = 0.0  # s added to every server → client chunk
    jitter: float = 0.0  # s, uniform extra on top of ``delay``
    reset_rate: float = 0.0  # resets per second per connection
    refuse: float = 0.0  # probability that a new connection is refused


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port`` with :class:`Faults`."""

    def __init__(self, target_host: str, target_port: int, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.port = 0
        self.accepted = 0
        self.resets = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def set(self, faults: Faults) -> None:
        """Apply ``faults`` from now on."""
        self.faults = faults

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen (port 0: a free one) and return the port."""
        self._server = await asyncio.start_server(self._accept, host, port)
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.rng.random() < self.faults.refuse:
            self.refused += 1
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            return
        self.accepted += 1
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer, delayed=False)),
            asyncio.create_task(self._pump(up_reader, writer, delayed=True)),
            asyncio.create_task(self._resetter()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.transport.abort()

    async def _resetter(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            if self.rng.random() < self.faults.reset_rate * _TICK:
                self.resets += 1
                return

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool
    ) -> None:
        if not delayed:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._release(queue, writer))
        last = 0.0
        try:
            while data := await reader.read(65536):
                f = self.faults
                due = time.monotonic() + f.delay + f.jitter * self.rng.random()
                last = max(last, due)  # keep the byte order
                queue.put_nowait((last, data))
                if sender.done():
                    return
            await queue.join()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender

    @staticmethod
    async def _release(
        queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            queue.task_done()
