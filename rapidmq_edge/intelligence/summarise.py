"""Per-stream summaries (count / min / max / mean per window) of routine readings.

Pure bookkeeping, no I/O: the runtime feeds readings it chose not to forward one by one
(:meth:`Summariser.add`) and asks for the windows that are due (:meth:`Summariser.due`);
each comes back as a :class:`Summary` whose :meth:`Summary.payload` is what goes upstream.
An open window's :meth:`Summary.state` is what the runtime stores durably before the
readings in it are acknowledged; :meth:`Summariser.restore` takes it back after a restart.
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

    def state(self) -> bytes:
        """The open window as JSON (floats round-trip exactly; ``targets`` must be JSON)."""
        return json.dumps([self.stream, self.start, self.end, self.count, self.minimum,
                           self.maximum, self.total, self.priority, self.targets,
                           self.window], separators=(",", ":")).encode()

    @classmethod
    def from_state(cls, data: bytes) -> Summary:
        """The inverse of :meth:`state`; ValueError when ``data`` is not one."""
        try:
            (stream, start, end, count, lo, hi, total, priority, targets,
             window) = json.loads(data)
            return cls(str(stream), float(start), float(end), int(count), float(lo),
                       float(hi), float(total), int(priority), targets, float(window))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a summary window: {exc}") from None


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

    def restore(self, summary: Summary) -> None:
        """Reopen a window stored by :meth:`Summary.state` (after a restart)."""
        self.open[summary.stream] = summary

    def due(self, now: float, everything: bool = False) -> list[Summary]:
        """Windows that are complete at ``now`` (all of them when ``everything``)."""
        out = [s for s in self.open.values() if everything or now - s.start >= self.window]
        for s in out:
            del self.open[s.stream]
        self.emitted += len(out)
        return out
