"""Fetchers that fill a :class:`~.download.PartialDownload`, and :func:`download`.

* :class:`MqttChunkFetcher`: subscribes (through the :class:`~.link.OtaLink`) to the
  retained chunk topics ``{prefix}/payload/{digest_hex}/{index}`` of the next ``window``
  missing chunks and unsubscribes as each arrives and checks out. A refused chunk stays
  subscribed (a corrected retained chunk arrives on the same subscription); a chunk that
  does not arrive within ``chunk_timeout`` is unsubscribed and asked for again after a
  per-chunk backoff. Timeouts do not count while the link is offline (subscriptions are
  restored on reconnect).
* :class:`HttpRangeFetcher`: ``GET`` with ``Range: bytes=a-b`` per chunk (aiohttp); only a
  ``206`` with the matching ``Content-Range`` and exactly the chunk's bytes is taken.

Both cap the bytes per second they ask for with a :class:`RateCap` (so forwarding keeps
priority on the link) and never give up: every failure is reported through the state
callback (``state, reason``), then retried after a capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import aiohttp

from ..telemetry import RepeatedLog
from ..uplink.backoff import Backoff
from .download import (
    ChunkPlanLike,
    DownloadError,
    PartialDownload,
    Progress,
    chunk_length,
)
from .link import OtaLink

__all__ = ["Fetcher", "HttpRangeFetcher", "MqttChunkFetcher", "ProgressCallback", "RateCap",
           "StateCallback", "chunk_topic", "download"]

log = logging.getLogger(__name__)

#: ``on_progress(progress)`` after every stored chunk (and once at the start)
ProgressCallback = Callable[[Progress], None]
#: ``on_state(state, reason)``: "downloading", "retrying", "waiting", "downloaded"
StateCallback = Callable[[str, str], None]


def chunk_topic(prefix: str, payload_digest: bytes, index: int) -> str:
    """``{prefix}/payload/{digest_hex}/{index}``: where chunk ``index`` is retained."""
    return f"{prefix.rstrip('/')}/payload/{payload_digest.hex()}/{index}"


def _nothing(*_: object) -> None:
    return None


class RateCap:
    """Bytes per second (0 = unlimited), with ``burst`` bytes of credit after idling.

    :meth:`reserve` books ``n`` bytes and returns how long to wait before using them: the
    time until everything booked before is paid for at ``rate`` (a debt model, so chunks
    larger than the burst pass too and the long-run rate is exact).
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError("rate must be >= 0")
        self.rate = rate
        self.burst = burst if burst is not None else rate * 0.1
        self.clock = clock
        self._paid_at = float("-inf")  # starts with the burst credited

    def reserve(self, n: int) -> float:
        """Book ``n`` bytes; seconds to wait before using them."""
        if not self.rate:
            return 0.0
        now = self.clock()
        start = max(self._paid_at, now - self.burst / self.rate)
        self._paid_at = start + n / self.rate
        return max(0.0, start - now)

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be used."""
        delay = self.reserve(n)
        if delay > 0:
            await asyncio.sleep(delay)


class Fetcher(Protocol):
    """Fills a partial download until it is complete (never gives up on its own)."""

    async def fill(self, partial: PartialDownload, on_progress: ProgressCallback,
                   on_state: StateCallback) -> None: ...


def _retry_backoff(maximum: float) -> Backoff:
    return Backoff(initial=min(0.5, maximum), maximum=maximum)


class MqttChunkFetcher:
    """Fetch retained chunks over the OTA link (see the module docstring)."""

    def __init__(self, link: OtaLink, prefix: str | None = None, window: int = 4,
                 bandwidth: float = 0.0, *, chunk_timeout: float = 10.0,
                 retry_max: float = 30.0) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.link = link
        self.prefix = (prefix if prefix is not None else link.prefix).rstrip("/")
        self.window = window
        self.cap = RateCap(bandwidth)
        self.chunk_timeout = chunk_timeout
        self.retry_max = retry_max
        self.requests = 0  # subscriptions made for chunks (first asks and retries)
        self._repeats = RepeatedLog(log)

    async def fill(self, partial: PartialDownload, on_progress: ProgressCallback = _nothing,
                   on_state: StateCallback = _nothing) -> None:
        plan = partial.plan
        base = chunk_topic(self.prefix, plan.payload_digest, 0)[:-1]
        arrived: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()

        async def on_message(topic: str, payload: bytes, retained: bool) -> None:
            if topic.startswith(base):
                tail = topic[len(base):]
                if tail.isdigit():
                    arrived.put_nowait((int(tail), payload))

        outstanding: dict[int, float] = {}  # index -> deadline
        retry_at: dict[int, float] = {}
        backoffs: dict[int, Backoff] = {}
        waiting_reported = False
        self.link.add_listener(on_message)
        on_state("downloading", f"{len(partial.missing())} of {partial.total} chunks to fetch")
        try:
            while not partial.complete():
                now = time.monotonic()
                for i in partial.missing():
                    if len(outstanding) >= self.window:
                        break
                    if i in outstanding or retry_at.get(i, 0.0) > now:
                        continue
                    await self.cap.take(chunk_length(plan, i))
                    outstanding[i] = time.monotonic() + self.chunk_timeout
                    self.requests += 1
                    await self.link.subscribe(base + str(i), 1)
                now = time.monotonic()
                wake = min([*outstanding.values(), *(t for t in retry_at.values() if t > now)],
                           default=now + 1.0)
                try:
                    index, data = await asyncio.wait_for(arrived.get(), max(0.01, wake - now))
                except TimeoutError:
                    pass
                else:
                    if partial.put(index, data):
                        if index in outstanding:
                            del outstanding[index]
                            backoffs.pop(index, None)
                            retry_at.pop(index, None)
                            await self.link.unsubscribe(base + str(index))
                        on_progress(partial.progress)
                    else:
                        on_state("retrying", f"chunk {index} refused: {partial.last_refusal}")
                now = time.monotonic()
                if not self.link.online:
                    for i in outstanding:  # subscriptions come back with the connection
                        outstanding[i] = max(outstanding[i], now + self.chunk_timeout)
                    if not waiting_reported:
                        on_state("waiting", "the OTA link is offline")
                        waiting_reported = True
                    continue
                if waiting_reported:
                    waiting_reported = False
                    on_state("downloading", "the OTA link is back")
                for i, deadline in list(outstanding.items()):
                    if deadline > now:
                        continue
                    del outstanding[i]
                    await self.link.unsubscribe(base + str(i))
                    b = backoffs.setdefault(i, _retry_backoff(self.retry_max))
                    delay = b.next()
                    retry_at[i] = now + delay
                    reason = (f"chunk {i} not received within {self.chunk_timeout:g} s "
                              f"(attempt {b.attempt}, next in {delay:.1f} s)")
                    self._repeats(f"timeout {partial.digest_hex}", logging.WARNING,
                                  "ota fetch %s: %s", partial.digest_hex[:12], reason)
                    on_state("retrying", reason)
        finally:
            self.link.remove_listener(on_message)
            for i in outstanding:
                with contextlib.suppress(Exception):
                    await self.link.unsubscribe(base + str(i))


class RangeRefused(DownloadError):
    """An HTTP answer that is not exactly the requested range."""


class HttpRangeFetcher:
    """Fetch chunks with HTTP Range requests (see the module docstring)."""

    def __init__(self, url: str, *, window: int = 2, bandwidth: float = 0.0,
                 timeout: float = 30.0, retry_max: float = 30.0,
                 headers: Mapping[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, read_size: int = 16384) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"unsupported payload URL {url!r} (http:// or https://)")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.url = url
        self.window = window
        self.cap = RateCap(bandwidth)
        self.timeout = timeout
        self.retry_max = retry_max
        self.headers = dict(headers or {})
        self.ssl_context = ssl_context
        self.read_size = read_size
        self.requests = 0
        self._repeats = RepeatedLog(log)

    async def fill(self, partial: PartialDownload, on_progress: ProgressCallback = _nothing,
                   on_state: StateCallback = _nothing) -> None:
        pending = partial.missing()
        on_state("downloading", f"{len(pending)} of {partial.total} chunks to fetch")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                        sock_read=self.timeout)
        connector = aiohttp.TCPConnector(ssl=self.ssl_context if self.ssl_context else True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def worker() -> None:
                while pending:
                    i = pending.pop(0)
                    backoff = _retry_backoff(self.retry_max)
                    while not partial.has(i):
                        try:
                            data = await self._get(session, partial.plan, i)
                        except (aiohttp.ClientError, TimeoutError, RangeRefused) as exc:
                            reason = f"chunk {i}: {exc!r}"
                        else:
                            if partial.put(i, data):
                                on_progress(partial.progress)
                                break
                            reason = f"chunk {i} refused: {partial.last_refusal}"
                        delay = backoff.next()
                        self._repeats(f"http {self.url}", logging.WARNING,
                                      "ota fetch %s: %s", self.url, reason)
                        on_state("retrying", f"{reason} (next try in {delay:.1f} s)")
                        await asyncio.sleep(delay)

            await asyncio.gather(*(worker() for _ in range(self.window)))

    async def _get(self, session: aiohttp.ClientSession, plan: ChunkPlanLike,
                   index: int) -> bytes:
        length = chunk_length(plan, index)
        start = index * plan.chunk_size
        end = start + length - 1
        await self.cap.take(length)
        self.requests += 1
        headers = {**self.headers, "Range": f"bytes={start}-{end}"}
        async with session.get(self.url, headers=headers) as resp:
            if resp.status != 206:
                raise RangeRefused(f"HTTP {resp.status} for bytes {start}-{end} (206 required)")
            want = f"bytes {start}-{end}/"
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(want) or content_range[len(want):] not in (
                    str(plan.payload_size), "*"):
                raise RangeRefused(
                    f"Content-Range {content_range!r}, expected {want}{plan.payload_size}")
            body = bytearray()
            async for piece in resp.content.iter_chunked(self.read_size):
                body += piece
                if len(body) > length:  # never read past the signed length
                    raise RangeRefused(f"more than the {length} bytes of chunk {index}")
            return bytes(body)


async def download(plan: ChunkPlanLike, fetcher: Fetcher, directory: Path | str, *,
                   dest: Path | str | None = None, on_progress: ProgressCallback = _nothing,
                   on_state: StateCallback = _nothing) -> Path:
    """Fetch ``plan`` into ``directory`` (resuming a partial there) and return the finished
    file (``dest``, default ``<directory>/<digest_hex>``), its size and SHA-256 checked."""
    partial = PartialDownload(directory, plan)
    try:
        on_progress(partial.progress)
        while True:
            if not partial.complete():
                await fetcher.fill(partial, on_progress, on_state)
            try:
                path = partial.finish(dest)
            except DownloadError as exc:
                if partial.complete():
                    raise  # every chunk checks out but the whole does not: a broken plan
                on_state("retrying", str(exc))
                continue
            on_state("downloaded",
                     f"{plan.payload_size} bytes, SHA-256 {plan.payload_digest.hex()}")
            return path
    finally:
        partial.close()
