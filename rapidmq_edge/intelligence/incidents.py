"""Anomaly incidents: one per episode of a stream, not one per reading.

The stream detector (:mod:`.stream_detector`) says which reading *opens* an anomaly episode
and whether the episode is still open (it closes after ``calm_readings`` normal readings).
:class:`Incidents` turns that into events an operator can act on: an incident opens with
an id, a kind, the reading, the expected value and band, and closes with how long it lasted
and how many readings it spanned. Per stream, at most ``per_hour`` incidents are announced
per hour of the stream's own time (the device clock when readings carry one); the rest are
counted as suppressed. A stream's ``sensitivity`` (a topic-filter rule) can demand a
smaller p-value before an opening is announced, or none at all.

Pure: no clock, no I/O; the runtime publishes the events.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..mqtt.topics import topic_matches
from .stream_detector import Verdict

__all__ = ["DETECTOR_VERSION", "SENSITIVITIES", "Incident", "IncidentEvent", "Incidents"]

#: what alerts name as their model (the stream detector's method, see its module)
DETECTOR_VERSION = "stream-detector/1"
#: sensitivity -> how much smaller a p-value must be than the detector's to announce
SENSITIVITIES: dict[str, float | None] = {
    "normal": 1.0, "low": 0.1, "very_low": 0.01, "off": None,
}
#: streams whose state is kept before the oldest quiet ones are forgotten
MAX_STREAMS = 100_000


@dataclass(slots=True)
class Incident:
    """An open anomaly episode of one stream."""

    id: str
    stream: str
    kind: str
    opened_at: float
    announced: bool
    readings: int = 1
    peak: float = 0.0  # the highest likelihood seen


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    """An incident opened or closed; ``payload`` is the alert's JSON object."""

    state: str  # "open" or "closed"
    incident: Incident
    payload: dict[str, Any] = field(default_factory=dict)


class Incidents:
    """The open incidents of every stream and the announcements they make."""

    def __init__(self, per_hour: int = 6, sensitivity: Sequence[tuple[str, str]] = (),
                 p_open: float = 5e-3, source: str = "detector") -> None:
        self.per_hour = per_hour
        self.rules = [(filt, SENSITIVITIES[level]) for filt, level in sensitivity]
        self.p_open = p_open
        self.source = source
        self.open: dict[str, Incident] = {}
        self._announced: dict[str, deque[float]] = {}
        self._factor: dict[str, float | None] = {}
        self._ids = itertools.count(1)
        self._prefix = f"{int(time.time()):x}-"
        self.opened = 0
        self.closed = 0
        self.suppressed = 0

    def sensitivity(self, stream: str) -> float | None:
        """The stream's factor (first matching rule; ``normal`` = 1.0; None: never)."""
        f = self._factor.get(stream, 0.0)
        if f == 0.0:
            f = next((factor for filt, factor in self.rules if topic_matches(filt, stream)),
                     1.0)
            if len(self._factor) >= MAX_STREAMS:
                self._factor.clear()
            self._factor[stream] = f
        return f

    def update(self, stream: str, t: float, value: float, v: Verdict) -> list[IncidentEvent]:
        """Account for one reading's verdict; return the events to announce (an incident
        opened, or closed; only announced incidents announce their end)."""
        inc = self.open.get(stream)
        out: list[IncidentEvent] = []
        if v.opens:
            if inc is not None:  # a far stronger reading inside: a new incident
                out.append(self._close(inc, t))
            out.append(self._open(stream, t, value, v))
        elif inc is not None:
            inc.readings += 1
            inc.peak = max(inc.peak, v.likelihood)
            if not v.in_episode:
                out.append(self._close(inc, t))
        return [e for e in out if e.incident.announced]

    def _open(self, stream: str, t: float, value: float, v: Verdict) -> IncidentEvent:
        factor = self.sensitivity(stream)
        announce = factor is not None and (1.0 - v.likelihood) <= self.p_open * factor
        if announce:
            recent = self._announced.setdefault(stream, deque())
            while recent and recent[0] <= t - 3600.0:
                recent.popleft()
            if len(recent) >= self.per_hour:
                announce = False
                self.suppressed += 1
            else:
                recent.append(t)
        inc = Incident(f"{self._prefix}{next(self._ids)}", stream, v.kind, t, announce,
                       peak=v.likelihood)
        if len(self.open) >= MAX_STREAMS:
            self.open.pop(next(iter(self.open)))
        self.open[stream] = inc
        self.opened += 1
        return IncidentEvent("open", inc, {
            "state": "open", "incident": inc.id, "kind": v.kind, "stream": stream,
            "reading": value, "expected": _round(v.expected), "band": [_round(v.lo),
                                                                      _round(v.hi)],
            "score": round(v.likelihood, 6), "at": round(t, 3), "source": self.source,
        })

    def _close(self, inc: Incident, t: float) -> IncidentEvent:
        del self.open[inc.stream]
        self.closed += 1
        return IncidentEvent("closed", inc, {
            "state": "closed", "incident": inc.id, "kind": inc.kind, "stream": inc.stream,
            "readings": inc.readings, "duration_s": round(t - inc.opened_at, 3),
            "peak_score": round(inc.peak, 6), "at": round(t, 3), "source": self.source,
        })


def _round(x: float) -> float | None:
    return None if x != x else round(x, 6)  # NaN (not learnt yet) -> null
