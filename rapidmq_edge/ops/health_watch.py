"""The gateway watching its own health with the same detector it runs on device streams.

Every ``interval`` seconds :class:`HealthWatch` samples a few metrics of the gateway itself —
event-loop lag (the longest wake-up delay of the interval), the forward queue's commit
latency (a commit still being written counts up to now: a stuck disk shows while it is
stuck), backlog growth (queued messages per second), RSS, disk use, the upstreams' heartbeat
round trip — and feeds each into its own :class:`~rapidmq_edge.intelligence.stream_detector.
StreamDetector`. A sample is anomalous when the detector finds it very unlikely
(``1 - likelihood <= p``) *and* it is worse than expected by a margin that matters for that
metric (:data:`HEALTH_METRICS`: 200 ms more commit latency, 50 ms more loop lag, 5 more
points of disk use, ...): a gateway's own metrics are noisy, drift and step (another process
writes to the disk), and an operator's time is dear. An anomalous sample opens an incident,
announced on ``$edge/alerts/health/<metric>``; ``calm`` normal samples in a row close it
(announced too): normal means back within that margin of what was expected when it
opened (the detector learns fast, a stall's later samples look less strange to it than to an
operator). The state is under ``$SYS/broker/health/...``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..intelligence.incidents import DETECTOR_VERSION
from ..intelligence.stream_detector import DetectorParams, StreamDetector
from .process_stats import LoopLag, process_values

__all__ = ["HEALTH_METRICS", "HealthWatch"]

log = logging.getLogger(__name__)

#: what is watched, and by how much worse than expected a sample must be to matter
HEALTH_METRICS: dict[str, float] = {
    "loop_lag_ms": 50.0, "commit_ms": 200.0, "backlog_growth": 500.0, "rss_mb": 100.0,
    "disk_used_pct": 5.0, "upstream_rtt_ms": 200.0,
}


class HealthWatch:
    """Samples the gateway's metrics and runs a detector on each."""

    def __init__(self, publish: Callable[[str, bytes], None], loop_lag: LoopLag,
                 queue: Any = None, uplinks: Sequence[Any] = (), disk: Any = None,
                 interval: float = 10.0, params: DetectorParams | None = None,
                 p: float = 1e-4, calm: int = 6) -> None:
        """``publish(topic, payload)``: local publishing; ``queue``: the forward queue (or
        None), ``uplinks``: the uplink clients, ``disk``: the data directory's DiskSpace."""
        self.publish = publish
        self.loop_lag = loop_lag
        self.queue = queue
        self.uplinks = uplinks
        self.disk = disk
        self.interval = interval
        self.params = params or DetectorParams(warmup=120)
        self.detectors = {m: StreamDetector(self.params) for m in HEALTH_METRICS}
        self.p = p
        self.calm = calm
        #: metric -> [incident id, opened at, worst value, samples, normal samples in a row,
        #: the value expected when it opened]
        self.open: dict[str, list[Any]] = {}
        self.incidents = 0
        self._ids = itertools.count(1)
        self._prefix = f"health-{int(time.time()):x}-"
        self.last: dict[str, float] = {}
        self._lag_seen = 0
        self._backlog: tuple[float, int] | None = None

    def sample(self, now: float) -> dict[str, float]:
        """The metrics now (a metric that has no source is left out)."""
        out: dict[str, float] = {}
        lag = list(self.loop_lag.samples)
        new = lag[self._lag_seen:] if self._lag_seen <= len(lag) else lag
        self._lag_seen = len(lag)
        if new:
            out["loop_lag_ms"] = max(new) * 1000.0
        q = self.queue
        if q is not None:
            out["commit_ms"] = q.commit_latency() * 1000.0
            queued = int(q.stats()["messages"])
            if self._backlog is not None and now > self._backlog[0]:
                out["backlog_growth"] = (queued - self._backlog[1]) / (now - self._backlog[0])
            self._backlog = (now, queued)
        out["rss_mb"] = process_values()["rss_bytes"] / 1048576.0
        d = self.disk
        if d is not None and d.total:
            out["disk_used_pct"] = 100.0 * (1.0 - d.free / d.total)
        rtts = [u.heartbeat_rtt_ms for u in self.uplinks if u.heartbeat_rtt_ms is not None]
        if rtts:
            out["upstream_rtt_ms"] = max(rtts)
        return out

    def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Sample, judge every metric, announce what opens or closes; the announcements."""
        now = time.time() if now is None else now
        values = self.sample(now)
        self.last = values
        out = []
        for metric, value in values.items():
            v = self.detectors[metric].update(now, value)
            bad = (1.0 - v.likelihood <= self.p and v.expected == v.expected
                   and value - v.expected >= HEALTH_METRICS[metric])
            inc = self.open.get(metric)
            payload: dict[str, Any] | None = None
            if inc is None and bad:
                inc = self.open[metric] = [f"{self._prefix}{next(self._ids)}", now, value, 1, 0,
                                           v.expected]
                self.incidents += 1
                payload = {"state": "open", "reading": round(value, 3),
                           "expected": round(v.expected, 3),
                           "band": [round(v.lo, 3), round(v.hi, 3)],
                           "score": round(v.likelihood, 6)}
            elif inc is not None:
                inc[2] = max(inc[2], value)
                inc[3] += 1
                normal = value - inc[5] < HEALTH_METRICS[metric]
                inc[4] = inc[4] + 1 if normal else 0
                if inc[4] >= self.calm:
                    del self.open[metric]
                    payload = {"state": "closed", "samples": inc[3],
                               "duration_s": round(now - inc[1], 3), "worst": round(inc[2], 3)}
            if payload is None:
                continue
            assert inc is not None
            payload = {**payload, "incident": inc[0], "metric": metric, "kind": "health",
                       "at": round(now, 3), "source": "health", "model": DETECTOR_VERSION}
            log.warning("health: %s %s (incident %s, value %.3f)", metric,
                        "anomalous" if payload["state"] == "open" else "back to normal",
                        inc[0], value)
            self.publish(f"$edge/alerts/health/{metric}",
                         json.dumps(payload, separators=(",", ":")).encode())
            out.append(payload)
        return out

    async def run(self) -> None:
        """Tick every ``interval`` seconds (cancel to stop)."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # the watch must never stop the gateway
                log.exception("health: sampling failed")

    def sys_values(self) -> dict[str, str]:
        """``$SYS/broker/health/...``: each metric's last value and whether it is in an
        incident."""
        out = {f"health/{m}": f"{v:.3f}" for m, v in self.last.items()}
        for m in HEALTH_METRICS:
            out[f"health/{m}/incident"] = self.open[m][0] if m in self.open else ""
        return out

    def snapshot(self) -> dict[str, Any]:
        """For ``status``: last values and the open incidents."""
        return {"metrics": {m: round(v, 3) for m, v in self.last.items()},
                "incidents_open": sorted(self.open), "incidents": self.incidents}
