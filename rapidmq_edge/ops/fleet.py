"""The fleet view: each gateway keeps a compact retained status on a topic of its upstream
(``[fleet]``), with ``{"state": "offline"}`` as its link's will; one subscriber to
``rapidmq/fleet/+`` lists the fleet (``rapidmq-edge fleet status``).

The status (JSON): ``id``, ``state`` (``online`` / ``offline``), ``version``, ``uptime_s``,
``backlog`` (messages queued), ``upstreams`` (name -> connected), ``models`` (name ->
version), ``alerts_1h`` (alerts in the last hour) and ``at`` (Unix time it was written).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import __version__
from ..uplink.client import UplinkClient

__all__ = ["FleetPublisher", "fleet_status", "fleet_table", "offline_payload"]

log = logging.getLogger(__name__)

Snapshot = Callable[[], dict[str, Any]]


def offline_payload(gateway_id: str) -> bytes:
    """The status the broker publishes (the link's retained will) when the gateway dies."""
    return json.dumps({"id": gateway_id, "state": "offline", "at": None},
                      separators=(",", ":")).encode()


def fleet_status(snap: Mapping[str, Any], uptime_s: float, alerts_1h: int,
                 state: str = "online") -> dict[str, Any]:
    """The compact status of a gateway from its ``Gateway.snapshot()``."""
    fwd = snap.get("forwarding") or {}
    intel = snap.get("intelligence") or {}
    return {
        "id": snap.get("gateway"),
        "state": state,
        "version": __version__,
        "uptime_s": round(uptime_s),
        "backlog": fwd.get("queued", 0),
        "upstreams": {n: bool(u.get("connected"))
                      for n, u in (fwd.get("upstreams") or {}).items()},
        "models": {n: m.get("version") for n, m in (intel.get("models") or {}).items()},
        "alerts_1h": alerts_1h,
        "at": round(time.time(), 3),
    }


class AlertWindow:
    """Alerts counted in the last hour from a monotonically growing total."""

    def __init__(self, window: float = 3600.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, total: int) -> int:
        """Record ``total`` at ``now``; return how much it grew within the window."""
        self.samples.append((now, total))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window:
            self.samples.popleft()
        return total - self.samples[0][1]


class FleetPublisher:
    """Publishes :func:`fleet_status` through ``client`` every ``interval`` s and at once
    after each new session (the will may have replaced it while the link was down)."""

    def __init__(self, client: UplinkClient, topic: str, interval: float,
                 snapshot: Snapshot) -> None:
        self.client = client
        self.topic = topic
        self.interval = interval
        self.snapshot = snapshot
        self.started = time.monotonic()
        self.alerts = AlertWindow()
        self.published = 0

    def status(self, state: str = "online") -> dict[str, Any]:
        """The current status document."""
        snap = self.snapshot()
        total = int((snap.get("intelligence") or {}).get("alerts", 0))
        recent = self.alerts.observe(time.monotonic(), total)
        return fleet_status(snap, time.monotonic() - self.started, recent, state)

    def publish(self, state: str = "online") -> bool:
        """Publish the status now (retained); False when the link is down."""
        body = json.dumps(self.status(state), separators=(",", ":")).encode()
        ok = self.client.publish_now(self.topic, body, retain=True)
        self.published += ok
        return ok

    async def run(self, tick: float = 0.5) -> None:
        """Forever (cancel to stop)."""
        seen, due = -1, 0.0
        while True:
            now = time.monotonic()
            fresh = self.client.sessions != seen or now >= due
            if self.client.connected and fresh and self.publish():
                seen, due = self.client.sessions, now + self.interval
            await asyncio.sleep(min(tick, self.interval))


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def fleet_table(statuses: Iterable[Mapping[str, Any]], now: float | None = None) -> str:
    """The fleet as a text table, one gateway per line, sorted by id."""
    now = time.time() if now is None else now
    head = ("GATEWAY", "STATE", "VERSION", "UPTIME", "BACKLOG", "UPSTREAMS", "MODELS",
            "ALERTS/1H", "SEEN")
    rows = [head]
    for s in sorted(statuses, key=lambda s: str(s.get("id"))):
        online = s.get("state") == "online"
        ups = s.get("upstreams") or {}
        rows.append((
            str(s.get("id", "?")),
            str(s.get("state", "?")),
            str(s.get("version", "-")) if online else "-",
            _age(float(s.get("uptime_s", 0))) if online else "-",
            str(s.get("backlog", "-")) if online else "-",
            ",".join(f"{n}:{'up' if c else 'DOWN'}" for n, c in sorted(ups.items())) or "-",
            ",".join(f"{n}={v}" for n, v in sorted((s.get("models") or {}).items())) or "-",
            str(s.get("alerts_1h", "-")) if online else "-",
            _age(max(0.0, now - float(s["at"]))) + " ago" if s.get("at") else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
