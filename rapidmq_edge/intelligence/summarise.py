"""Per-stream summaries (count / min / max / mean per window) of routine readings.

Pure bookkeeping, no I/O: the runtime feeds readings it chose not to forward one by one
(:meth:`Summariser.add`) and asks for the windows that are due (:meth:`Summariser.due`);
each comes back as a :class:`Summary` whose :meth:`Summary.payload` is what goes upstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SUMMARY_FORMAT = "rmqe-summary/1"


@dataclass(slots=True)
class Summary:
    """The readings of one stream in ``[start, end]`` (wall-clock seconds)."""

    stream: str
    start: float
    end: float
    count: int
    minimum: float
    maximum: float
    total: float
    priority: int
    targets: Any = None  # what the runtime needs to forward it (opaque here)
    window: float = 0.0

    @property
    def mean(self) -> float:
        """Mean of the readings."""
        return self.total / self.count

    def payload(self) -> bytes:
        """JSON: stream, window bounds, count, min, max, mean."""
        return json.dumps({
            "summary": SUMMARY_FORMAT, "stream": self.stream, "window_s": self.window,
            "start": round(self.start, 3), "end": round(self.end, 3), "count": self.count,
            "min": self.minimum, "max": self.maximum, "mean": self.mean,
        }, separators=(",", ":")).encode()


@dataclass
class Summariser:
    """Open windows per stream; a window closes ``window`` seconds after its first reading."""

    window: float
    open: dict[str, Summary] = field(default_factory=dict)
    readings: int = 0  # readings folded into summaries
    emitted: int = 0  # summaries handed out

    def add(self, stream: str, t: float, value: float, priority: int, targets: Any) -> None:
        """Fold one reading (at wall-clock ``t``) into its stream's open window."""
        s = self.open.get(stream)
        if s is None:
            self.open[stream] = Summary(stream, t, t, 1, value, value, value, priority,
                                        targets, self.window)
        else:
            s.end = t
            s.count += 1
            s.total += value
            if value < s.minimum:
                s.minimum = value
            if value > s.maximum:
                s.maximum = value
        self.readings += 1

    def due(self, now: float, everything: bool = False) -> list[Summary]:
        """Windows that are complete at ``now`` (all of them when ``everything``)."""
        out = [s for s in self.open.values() if everything or now - s.start >= self.window]
        for s in out:
            del self.open[s.stream]
        self.emitted += len(out)
        return out
