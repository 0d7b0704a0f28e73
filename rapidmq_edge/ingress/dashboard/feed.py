"""One snapshot a second, shared by every open dashboard.

:class:`SnapshotFeed` builds the snapshot (a callable given by the assembly) once a second
while at least one dashboard is open, serialises it once into a Server-Sent Events frame,
and hands the same bytes to every viewer. A viewer only ever holds the latest frame: a slow
one skips frames, it never queues them. With no viewer nothing is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from ...telemetry import RepeatedLog

__all__ = ["SnapshotFeed", "Viewer"]

log = logging.getLogger(__name__)


class Viewer:
    """One open dashboard: the latest frame it has not written yet."""

    __slots__ = ("frame", "wake")

    def __init__(self) -> None:
        self.frame: bytes | None = None
        self.wake = asyncio.Event()

    def offer(self, frame: bytes) -> None:
        """Replace what is waiting (never grows)."""
        self.frame = frame
        self.wake.set()

    def take(self) -> bytes | None:
        frame, self.frame = self.frame, None
        self.wake.clear()
        return frame


class SnapshotFeed:
    """The 1 Hz snapshot loop and its viewers."""

    def __init__(self, build: Callable[[], dict[str, Any]], interval: float = 1.0) -> None:
        self.build = build
        self.interval = interval
        self.viewers: set[Viewer] = set()
        self.latest: bytes | None = None
        self.builds = 0
        self.build_seconds = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._repeats = RepeatedLog(log)

    def start(self) -> None:
        """Run the loop (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop and wake every viewer (they see ``closed``)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for v in self.viewers:
            v.wake.set()

    def join(self) -> Viewer:
        """A new viewer, given the latest frame at once (if there is one)."""
        v = Viewer()
        if self.latest is not None:
            v.offer(self.latest)
        self.viewers.add(v)
        self._wake.set()
        return v

    def leave(self, v: Viewer) -> None:
        self.viewers.discard(v)

    def frame(self) -> bytes:
        """Build and serialise one snapshot (counted), as an SSE ``snapshot`` event."""
        t0 = time.perf_counter()
        snap = self.build()
        self.builds += 1
        snap["feed"] = {"builds": self.builds, "viewers": len(self.viewers),
                        # build + serialise, mean over the previous builds (ms)
                        "build_ms_mean": round(1000 * self.build_seconds
                                               / max(1, self.builds - 1), 3)}
        data = json.dumps(snap, separators=(",", ":"), default=str)
        self.build_seconds += time.perf_counter() - t0
        return b"event: snapshot\ndata: " + data.encode() + b"\n\n"

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.viewers:
                self.latest = None  # stale by the time someone opens a dashboard
                self._wake.clear()
                await self._wake.wait()
            due = loop.time() + self.interval
            try:
                self.latest = self.frame()
            except Exception as exc:  # a bad value must not end every dashboard
                self._repeats("build", logging.ERROR, "dashboard snapshot failed: %r", exc)
            else:
                for v in self.viewers:
                    v.offer(self.latest)
            await asyncio.sleep(max(0.0, due - loop.time()))
