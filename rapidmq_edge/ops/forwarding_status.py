"""What store-and-forward reports: queue depth per upstream and class, drops, link state,
drain rate and ETA, the backlog and disk forecast (``rapidmq-edge status``, ``$SYS``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config.forwarding import PRIORITIES, QueueSettings
from ..pipeline.forwarder import Forwarder
from ..store.forward_queue import ForwardQueue
from ..uplink.client import UplinkClient
from .forecast import CapacityForecaster, LaneBounds, disk_free
from .sys_topics import flatten

__all__ = ["ForwardingStatus"]


class ForwardingStatus:
    """Reads the queue, the forwarder, the protection and the uplinks; keeps the forecaster
    (fed once a second by :meth:`run`) between calls."""

    def __init__(self, queue: ForwardQueue, forwarder: Forwarder, protect: Any,
                 uplinks: Sequence[UplinkClient], settings: QueueSettings,
                 data_dir: Path) -> None:
        self.queue = queue
        self.forwarder = forwarder
        self.protect = protect  # pipeline.protect.Protector or None
        self.uplinks = uplinks
        self.data_dir = data_dir
        self.forecaster = CapacityForecaster(
            {n: LaneBounds(c.max_messages, c.max_bytes, c.policy)
             for n, c in settings.classes.items()},
            settings.max_bytes,
        )

    async def run(self, every: float = 1.0) -> None:
        """Feed the forecaster a sample every ``every`` seconds (its rates follow a step
        within a few samples)."""
        while True:
            self._forecast(self.queue.stats(), time.monotonic())
            await asyncio.sleep(every)

    def snapshot(self) -> dict[str, Any]:
        """Queue depth per upstream and class, drops, link state, drain rate and ETA."""
        stats = self.queue.stats()
        now = time.monotonic()
        forecast = self._forecast(stats, now)
        names = {v: k for k, v in PRIORITIES.items()}
        upstreams: dict[str, Any] = {}
        for client in self.uplinks:
            lanes = stats["upstreams"].get(client.name, {})
            queued = sum(c["messages"] for c in lanes.values())
            fc = forecast["upstreams"].get(client.name) or {}
            upstreams[client.name] = {
                **client.status(),
                "queued": queued,
                "queued_bytes": sum(c["bytes"] for c in lanes.values()),
                "oldest_age": max((c["oldest_age"] for c in lanes.values()), default=0.0),
                "classes": {names.get(p, str(p)): c for p, c in lanes.items()},
                # the forecast's: acks/s, and the one ETA (net of what keeps arriving)
                "drain_rate": fc.get("drain_msg_per_s", 0.0),
                "drain_eta_s": fc.get("drains_in_s"),
                "forecast": fc or None,
            }
        return {
            "upstreams": upstreams,
            "queued": stats["messages"],
            "queued_bytes": stats["bytes"],
            "drops": stats["drops"],
            "commits": stats["commits"],
            "commit_failures": stats["commit_failures"],
            "quarantined": stats["quarantined"],
            "refused": self.forwarder.refused,
            "forwarded": self.forwarder.forwarded,
            "forecast": forecast["queue"],
            **({"protection": self.protect.status()} if self.protect is not None else {}),
        }

    def _forecast(self, stats: dict[str, Any], now: float) -> dict[str, Any]:
        """Backlog and disk forecast (:mod:`.forecast`) from queue stats."""
        try:
            free = disk_free(self.data_dir)
        except OSError:
            free = 0
        acked = {c.name: c.acked for c in self.uplinks}
        return self.forecaster.observe(now, stats, acked, free)

    def sys_values(self) -> dict[str, str]:
        """The snapshot flattened to ``$SYS/broker/forward/...`` topic suffixes."""
        return flatten("forward", self.snapshot())
