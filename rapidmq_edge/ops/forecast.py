"""Capacity forecast for the forward queue: when it fills, when the disk fills, when it drains.

Pure: the caller passes the time, the queue's counters (:meth:`ForwardQueue.stats`), each
uplink's cumulative ack count and the free disk space (:func:`disk_free`), about once a
second. Rates (:class:`Rate`) are a smooth long average (time constant ``tau``) that
restarts from a short one (``short`` s) at a change point — when the two disagree by
more than noise for two samples running — so an outage ending, a drain starting or a rate
cap lifting is followed within a few seconds instead of a minute:

* growth (msg/s, B/s) per upstream and class lane and for the whole queue,
* drain (acks/s) per upstream; inflow = growth + drain (messages dropped by a bound are
  not counted, so inflow reads low once a bound is hit).

The one ETA is the net rate's: a backlog drains in ``queued / -(inflow - acks)``, not in
``queued / acks`` (which ignores what keeps arriving).

From those, at current rates: the time until a lane reaches its class bound
(``max_messages``/``max_bytes``) or the queue its ``max_bytes``; the time until the disk
is full (queued bytes plus an estimated SQLite overhead per row); or the time until the
backlog drains. A rate within ``max(0.1 msg/s, 2 % of inflow)`` of zero counts as stable.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ROW_OVERHEAD",
    "CapacityForecaster",
    "Ewma",
    "Rate",
    "LaneBounds",
    "disk_free",
    "format_duration",
]

#: estimated bytes on disk per queued row beyond topic + payload + properties (SQLite row
#: header, id/priority/qos/created/expires columns, b-tree and index share); see
#: tests/test_forecast.py, which measures it on a real queue file
ROW_OVERHEAD = 48
_PRIORITY_NAMES = {0: "alarm", 1: "high", 2: "normal", 3: "bulk"}


def disk_free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (for the unprivileged user)."""
    return shutil.disk_usage(path).free


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``2 h 10 min``, ``3 d 4 h``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    if s < 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(round(s / 3600), 24)
    return f"{d} d {h} h" if h else f"{d} d"


class Ewma:
    """Exponentially weighted moving average of a rate over irregular samples."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.value: float | None = None

    def add(self, rate: float, dt: float) -> float:
        """Blend in ``rate`` observed over the last ``dt`` seconds (the first one is taken)."""
        if self.value is None:
            self.value = rate
        else:
            self.value += (1 - math.exp(-dt / self.tau)) * (rate - self.value)
        return self.value


class Rate:
    """A rate from irregular samples. :attr:`value` is a long average (time constant
    ``tau``); when a short one (``short`` s) disagrees with it by more than
    ``max(floor, rel * scale)`` twice in a row — a step, not one noisy sample — the long one
    starts over as the plain mean of the samples since the step (the two that showed it
    included) until it spans ``tau`` again: smooth when nothing changes, right within a few
    samples after a change."""

    def __init__(self, tau: float, short: float = 3.0, rel: float = 0.3,
                 floor: float = 1.0) -> None:
        self.long = Ewma(tau)
        self.short = Ewma(short)
        self.rel = rel
        self.floor = floor
        self.resets = 0
        self._apart = 0
        self._recent: list[tuple[float, float]] = []  # the last two (rate, dt)
        self._window: list[float] | None = None  # [sum of rate*dt, sum of dt] since a step

    @property
    def value(self) -> float | None:
        return self.long.value

    def add(self, rate: float, dt: float) -> float:
        """Blend in ``rate`` observed over the last ``dt`` seconds."""
        self._recent = [*self._recent[-1:], (rate, dt)]
        s = self.short.add(rate, dt)
        w = self._window
        if w is not None:  # since a step: the plain mean, until it spans tau
            w[0] += rate * dt
            w[1] += dt
            self.long.value = w[0] / w[1]
            if w[1] >= self.long.tau:
                self._window = None
        else:
            self.long.add(rate, dt)
        v = self.long.value
        assert v is not None
        if abs(s - v) > max(self.floor, self.rel * max(abs(s), abs(v))):
            self._apart += 1
            if self._apart >= 2:
                w = self._window = [sum(r * d for r, d in self._recent),
                                    sum(d for _, d in self._recent)]
                self.long.value = w[0] / w[1]
                self._apart = 0
                self.resets += 1
        else:
            self._apart = 0
        return self.long.value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class LaneBounds:
    """One priority class's bounds (0 = unbounded) and what happens when they are hit."""

    max_messages: int = 0
    max_bytes: int = 0
    policy: str = "drop_oldest"


class _Level:
    """Rates of change of one (messages, bytes) level, and an optional ack counter."""

    def __init__(self, tau: float) -> None:
        self.msgs = Rate(tau)
        self.bytes = Rate(tau, floor=256.0)
        self.drain = Rate(tau)
        self.last: tuple[float, int, int, int] | None = None

    def update(self, now: float, msgs: int, nbytes: int, acked: int, min_dt: float) -> None:
        if self.last is not None:
            t, m, b, a = self.last
            dt = now - t
            if dt < min_dt:
                return
            self.msgs.add((msgs - m) / dt, dt)
            self.bytes.add((nbytes - b) / dt, dt)
            self.drain.add(max(0, acked - a) / dt, dt)
        self.last = (now, msgs, nbytes, acked)

    @property
    def ready(self) -> bool:
        return self.msgs.value is not None


def _until(room: float, rate: float) -> float | None:
    if rate <= 0:
        return None
    return max(0.0, room) / rate


class CapacityForecaster:
    """Keeps the rate estimates; :meth:`observe` returns the forecast documents."""

    def __init__(
        self,
        classes: Mapping[int, LaneBounds],
        max_bytes: int = 0,
        tau: float = 60.0,
        min_dt: float = 1.0,
        row_overhead: int = ROW_OVERHEAD,
    ) -> None:
        self.classes = dict(classes)
        self.max_bytes = max_bytes
        self.tau = tau
        self.min_dt = min_dt
        self.row_overhead = row_overhead
        self._total = _Level(tau)
        self._ups: dict[str, _Level] = {}
        self._lanes: dict[tuple[str, int], _Level] = {}

    def observe(
        self, now: float, stats: Mapping[str, Any], acked: Mapping[str, int], free_disk: int
    ) -> dict[str, Any]:
        """Update with queue ``stats`` and per-upstream ``acked`` counts at ``now``; return
        ``{"queue": {...}, "upstreams": {name: {...}}}``, each with a ``text`` summary."""
        lanes: Mapping[str, Mapping[int, Mapping[str, Any]]] = stats["upstreams"]
        self._total.update(now, int(stats["messages"]), int(stats["bytes"]),
                           sum(acked.values()), self.min_dt)
        ups: dict[str, Any] = {}
        for name in sorted(set(lanes) | set(acked)):
            classes = lanes.get(name, {})
            msgs = sum(int(c["messages"]) for c in classes.values())
            nbytes = sum(int(c["bytes"]) for c in classes.values())
            level = self._ups.setdefault(name, _Level(self.tau))
            level.update(now, msgs, nbytes, int(acked.get(name, 0)), self.min_dt)
            for prio, c in classes.items():
                self._lanes.setdefault((name, prio), _Level(self.tau)).update(
                    now, int(c["messages"]), int(c["bytes"]), 0, self.min_dt)
            ups[name] = self._upstream(name, msgs, classes, level)
        return {"queue": self._queue(int(stats["bytes"]), free_disk), "upstreams": ups}

    # -- per upstream

    def _upstream(
        self, name: str, msgs: int, classes: Mapping[int, Mapping[str, Any]], level: _Level
    ) -> dict[str, Any]:
        if not level.ready:
            return {"state": "warming_up", "text": "measuring rates"}
        growth = level.msgs.value or 0.0
        drain = level.drain.value or 0.0
        inflow = max(0.0, growth + drain)
        eps = max(0.1, 0.02 * inflow)
        out: dict[str, Any] = {
            "inflow_msg_per_s": round(inflow, 2),
            "drain_msg_per_s": round(drain, 2),
            "growth_msg_per_s": round(growth, 2),
            "growth_bytes_per_s": round(level.bytes.value or 0.0, 1),
            "queue_full_in_s": None,
            "queue_full_bound": None,
            "drains_in_s": None,
        }
        if growth > eps:
            out["state"] = "growing"
            full, bound = self._lane_full(name, classes)
            if full is not None:
                out["queue_full_in_s"] = round(full, 1)
                out["queue_full_bound"] = bound
                out["text"] = f"queue full in {format_duration(full)} ({bound})"
            else:
                out["text"] = f"growing {growth:.1f} msg/s (no class bound)"
        elif growth < -eps and msgs > 0:
            out["state"] = "draining"
            out["drains_in_s"] = round(msgs / -growth, 1)
            out["text"] = (f"drains in {format_duration(msgs / -growth)} (in {inflow:.0f} "
                           f"msg/s, acked {drain:.0f} msg/s)")
        else:
            out["state"] = "stable"
            out["text"] = "stable" if msgs else "stable (empty)"
        return out

    def _lane_full(
        self, name: str, classes: Mapping[int, Mapping[str, Any]]
    ) -> tuple[float | None, str | None]:
        """The first class bound of ``name`` its lanes reach at current growth."""
        best: tuple[float | None, str | None] = (None, None)
        for prio, c in classes.items():
            lim = self.classes.get(prio)
            level = self._lanes.get((name, prio))
            if lim is None or level is None or not level.ready:
                continue
            consequence = "oldest dropped" if lim.policy == "drop_oldest" else "new refused"
            cls = _PRIORITY_NAMES.get(prio, str(prio))
            for bound, limit, have, rate in (
                ("max_messages", lim.max_messages, c["messages"], level.msgs.value),
                ("max_bytes", lim.max_bytes, c["bytes"], level.bytes.value),
            ):
                if not limit:
                    continue
                t = _until(limit - int(have), rate or 0.0)
                if t is not None and (best[0] is None or t < best[0]):
                    best = (t, f"class {cls} {bound}, then {consequence}")
        return best

    # -- whole queue and disk

    def _queue(self, nbytes: int, free_disk: int) -> dict[str, Any]:
        level = self._total
        out: dict[str, Any] = {
            "growth_bytes_per_s": None, "queue_full_in_s": None, "disk_full_in_s": None,
            "disk_free_bytes": free_disk,
        }
        if not level.ready:
            out["text"] = "measuring rates"
            return out
        byte_rate = level.bytes.value or 0.0
        msg_rate = level.msgs.value or 0.0
        out["growth_bytes_per_s"] = round(byte_rate, 1)
        if msg_rate <= max(0.1, 0.02 * (msg_rate + (level.drain.value or 0.0))):
            byte_rate = min(byte_rate, 0.0)  # stable within noise
        disk_rate = byte_rate + max(0.0, msg_rate) * self.row_overhead
        parts: list[str] = []
        full = _until(self.max_bytes - nbytes, byte_rate) if self.max_bytes else None
        if full is not None:
            out["queue_full_in_s"] = round(full, 1)
            parts.append(f"queue max_bytes reached in {format_duration(full)}")
        disk = _until(free_disk, disk_rate) if byte_rate > 0 else None
        if disk is not None and (full is None or disk < full):
            out["disk_full_in_s"] = round(disk, 1)
            parts.append(f"disk full in {format_duration(disk)} at current rate")
        if not parts:
            parts.append("not growing" if byte_rate <= 0 else "disk not at risk")
        out["text"] = "; ".join(parts)
        return out
