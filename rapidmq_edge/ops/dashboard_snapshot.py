"""The dashboard's once-a-second snapshot, built from what the status file shows.

:class:`DashboardSource` takes the gateway's status snapshot (``Gateway.snapshot``: the
broker's ``$SYS`` counters, the forwarding status, the intelligence runtime's and the
process's values, the same sources ``status.json`` and ``/metrics`` read) and adds what
only a live view needs: rates since the previous build, the topic tree
(:class:`~.traffic.TrafficCounter`), the connected clients
(:class:`~.traffic.ClientActivity`) and the incidents announced on ``$edge/alerts/#``.
The HTTP side (``ingress/dashboard``) builds it once a second and shares it between every
open dashboard.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..broker.broker import Broker
from ..broker.local import LocalClient
from ..broker.message import Message
from ..store.forward_queue import ForwardQueue
from .traffic import ClientActivity, TrafficCounter

__all__ = ["ALERTS_FILTER", "BROKER_DROPS", "DashboardSource", "counter", "drops",
           "shadow_runs"]

#: where the intelligence runtime and the health watch announce incidents
ALERTS_FILTER = "$edge/alerts/#"
#: the most topics and clients one snapshot lists (the busiest first)
MAX_ROWS = 200
#: closed incidents remembered
RECENT_INCIDENTS = 50

StatusSnapshot = Callable[[], dict[str, Any]]
#: the broker's drop counters: ``Stats`` field -> (where, reason), the ``path`` and
#: ``reason`` labels of ``rapidmq_messages_dropped_total`` (ops/metrics.py)
BROKER_DROPS = {
    "acl_denied": ("ingress", "acl_denied"),
    "too_large": ("ingress", "too_large"),
    "malformed": ("ingress", "malformed"),
    "publish_dropped": ("local", "queue_full"),
    "no_subscribers": ("local", "no_subscribers"),
}


def counter(status: dict[str, Any], name: str) -> int:
    """A broker counter of a status snapshot (``$SYS`` name, e.g. ``messages/received``):
    the number ``rapidmq-edge status`` prints and ``/metrics`` exports."""
    try:
        return int(status.get("broker", {}).get(name, 0))
    except (TypeError, ValueError):
        return 0


class _Incidents:
    """Open and recently closed incidents, from the alerts the gateway publishes."""

    def __init__(self) -> None:
        self.open: dict[str, dict[str, Any]] = {}
        self.closed: deque[dict[str, Any]] = deque(maxlen=RECENT_INCIDENTS)

    def __call__(self, msg: Message, retained: bool) -> None:
        try:
            alert = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(alert, dict):
            return
        parts = msg.topic.split("/", 3)  # $edge/alerts/<kind>/<stream>
        stream = str(alert.get("stream") or (parts[3] if len(parts) > 3 else msg.topic))
        key = f"{parts[2] if len(parts) > 2 else '?'}:{stream}"
        row = {"stream": stream, "kind": alert.get("kind") or (parts[2] if len(parts) > 2
                                                               else ""), **alert}
        if alert.get("state") == "open":
            self.open[key] = row
        elif alert.get("state") == "closed":
            opened = self.open.pop(key, {})
            self.closed.append({**opened, **row})


class DashboardSource:
    """Builds the dashboard snapshot; :meth:`build` is called once a second."""

    def __init__(self, status: StatusSnapshot, broker: Broker, traffic: TrafficCounter,
                 activity: ClientActivity, commit_ms: Callable[[], float | None],
                 queue: ForwardQueue | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.status = status
        self.broker = broker
        self.traffic = traffic
        self.activity = activity
        self.commit_ms = commit_ms
        self.queue = queue
        self.clock = clock
        self.incidents = _Incidents()
        self._alerts: LocalClient | None = None
        self._prev: tuple[float, dict[str, int], dict[str, int], dict[str, int]] | None = None

    def listen_for_alerts(self) -> None:
        """Subscribe to the gateway's own alerts (call once the broker runs)."""
        if self._alerts is None:
            self._alerts = LocalClient(self.broker, "$edge-dashboard", self.incidents)
            self._alerts.subscribe(ALERTS_FILTER)

    def close(self) -> None:
        """End the alerts subscription."""
        if self._alerts is not None:
            self._alerts.close()
            self._alerts = None

    def build(self) -> dict[str, Any]:
        """One snapshot (plain JSON types)."""
        status = self.status()
        now = self.clock()
        totals = {"in": counter(status, "messages/received"),
                  "out": counter(status, "messages/sent"),
                  "bytes_in": counter(status, "bytes/received"),
                  "bytes_out": counter(status, "bytes/sent")}
        protocols = {p: c[0] for p, c in self.traffic.by_protocol().items()}
        topics = {t: c[0] for t, c in self.traffic.topics.items()}
        origins = {o: c[0] for o, c in self.traffic.origins.items()}
        prev = self._prev
        self._prev = (now, {**totals, **{f"p:{k}": v for k, v in protocols.items()}},
                      topics, origins)
        dt = now - prev[0] if prev is not None else 0.0

        def rate(value: int, before: dict[str, int], key: str) -> float:
            if prev is None or dt <= 0:
                return 0.0
            return round(max(0, value - before.get(key, 0)) / dt, 2)  # new since: from 0

        p_totals = prev[1] if prev else {}
        p_topics = prev[2] if prev else {}
        p_origins = prev[3] if prev else {}
        fwd = status.get("forwarding") or {}
        intel = status.get("intelligence")
        proc = status.get("process") or {}
        return {
            "at": round(time.time(), 3),
            "gateway": status.get("gateway"),
            "version": __version__,
            "uptime_s": _uptime(status),
            "totals": totals,
            "rates": {
                "in": rate(totals["in"], p_totals, "in"),
                "out": rate(totals["out"], p_totals, "out"),
                "bytes_in": rate(totals["bytes_in"], p_totals, "bytes_in"),
                "bytes_out": rate(totals["bytes_out"], p_totals, "bytes_out"),
                "by_protocol": {p: rate(v, p_totals, f"p:{p}") for p, v in protocols.items()},
            },
            "clients": {
                "connected": counter(status, "clients/connected"),
                "sessions": counter(status, "clients/total"),
                "maximum": counter(status, "clients/maximum"),
                "list": self._clients(origins, p_origins, rate, intel),
                "disconnect_reasons": dict(self.activity.close_reasons),
                "recent_disconnects": [
                    {"at": round(t, 3), "client": c, "why": w}
                    for t, c, w in list(self.activity.closes)[-20:]][::-1],
            },
            "topics": self._topics(topics, p_topics, rate),
            "queue": _queue(fwd),
            "upstreams": _upstreams(fwd),
            "drops": drops(self.broker, self.queue),
            "commit_ms": _round(self.commit_ms()),
            "process": {"rss_bytes": proc.get("rss_bytes"), "open_fds": proc.get("open_fds"),
                        "loop_lag": proc.get("loop_lag"),
                        "disk_free_bytes": (status.get("disk") or {}).get("free_bytes")},
            "intelligence": self._intelligence(intel, status.get("ota")),
        }

    def _topics(self, topics: dict[str, int], before: dict[str, int],
                rate: Callable[[int, dict[str, int], str], float]) -> list[dict[str, Any]]:
        retained = self.broker.retained
        rows: list[dict[str, Any]] = [{"topic": t, "messages": n, "rate": rate(n, before, t),
                 "bytes": self.traffic.topics[t][1], "retained": t in retained}
                for t, n in topics.items()]
        rows += [{"topic": t, "messages": 0, "rate": 0.0, "bytes": 0, "retained": True}
                 for t in retained if t not in topics and not t.startswith("$SYS")]
        rows.sort(key=lambda r: (-r["rate"], -r["messages"], r["topic"]))
        return rows[:MAX_ROWS]

    def _clients(self, origins: dict[str, int], before: dict[str, int],
                 rate: Callable[[int, dict[str, int], str], float],
                 intel: dict[str, Any] | None) -> list[dict[str, Any]]:
        threats = _threats(self.activity)
        now = time.time()
        rows: list[dict[str, Any]] = []
        for cid, info in self.activity.clients.items():
            n = origins.get(cid, 0)
            rows.append({
                "client_id": cid, "protocol": info.protocol, "version": info.version,
                "username": info.username, "peer": info.peer,
                "connected_s": round(now - info.connected_at, 1),
                "messages": n, "rate": rate(n, before, cid),
                "refused_publishes": info.refused_publishes,
                "threat": threats.get(cid),
            })
        rows.sort(key=lambda r: (-r["rate"], -r["messages"], r["client_id"]))
        return rows[:MAX_ROWS]

    def _intelligence(self, intel: dict[str, Any] | None,
                      ota: dict[str, Any] | None) -> dict[str, Any] | None:
        if not intel:
            return None
        inc = intel.get("incidents") or {}
        threat = intel.get("threat") or {}
        return {
            "models": intel.get("models") or {},
            "fallback_active": bool(intel.get("fallback_active")),
            "scored": intel.get("scored", 0),
            "scores_per_s": intel.get("scores_per_s", 0.0),
            "streams": intel.get("streams", 0),
            "alerts": intel.get("alerts", 0),
            "incidents_open": inc.get("open", 0),
            "incidents_opened": inc.get("opened", 0),
            "incidents_closed": inc.get("closed", 0),
            "open": sorted(self.incidents.open.values(), key=lambda r: -float(r.get("at") or 0)),
            "closed": list(self.incidents.closed)[::-1],
            "threats_detected": threat.get("detected") or {},
            "shadow": shadow_runs(ota),
        }


def shadow_runs(ota: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The candidate models in shadow now (an OTA's ``components`` in state ``shadow``): the
    share of messages where the candidate agrees with the active model, and over how many."""
    out = []
    for name, c in ((ota or {}).get("components") or {}).items():
        sh = c.get("shadow") if isinstance(c, dict) else None
        if c.get("state") == "shadow" and isinstance(sh, dict):
            out.append({"component": name, "version": c.get("version"),
                        "agreement": sh.get("agreement"), "compared": sh.get("compared", 0),
                        "decision": sh.get("decision")})
    return out


def _uptime(status: dict[str, Any]) -> int:
    text = str(status.get("broker", {}).get("uptime", "0")).split()[0]
    return int(text) if text.isdigit() else 0


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _threats(activity: ClientActivity) -> dict[str, dict[str, Any]]:
    """The latest threat verdict per client (confidence is the score shown)."""
    out: dict[str, dict[str, Any]] = {}
    for v in getattr(activity.watch, "recent", ()) or ():
        out[v.client] = {"label": v.label, "score": v.confidence, "action": v.action}
    return out


def _queue(fwd: dict[str, Any]) -> dict[str, Any] | None:
    if not fwd:
        return None
    classes: dict[str, dict[str, float]] = {}
    for up in (fwd.get("upstreams") or {}).values():
        for name, c in (up.get("classes") or {}).items():
            row = classes.setdefault(name, {"messages": 0, "bytes": 0, "oldest_age": 0.0})
            row["messages"] += c.get("messages", 0)
            row["bytes"] += c.get("bytes", 0)
            row["oldest_age"] = max(row["oldest_age"], c.get("oldest_age", 0.0))
    forecast = fwd.get("forecast") or {}
    return {"messages": fwd.get("queued", 0), "bytes": fwd.get("queued_bytes", 0),
            "classes": classes, "commits": fwd.get("commits", 0),
            "commit_failures": fwd.get("commit_failures", 0),
            "forwarded": fwd.get("forwarded", 0),
            "forecast": forecast.get("text") if isinstance(forecast, dict) else None}


def _upstreams(fwd: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, u in (fwd.get("upstreams") or {}).items():
        out[name] = {
            "connected": bool(u.get("connected")), "url": u.get("current_url"),
            "rtt_ms": u.get("heartbeat_rtt_ms"), "inflight": u.get("inflight", 0),
            "acked": u.get("acked", 0), "queued": u.get("queued", 0),
            "oldest_age": u.get("oldest_age", 0.0), "drain_rate": u.get("drain_rate", 0.0),
            "drain_eta_s": u.get("drain_eta_s"), "last_error": u.get("last_error"),
        }
    return out


def drops(broker: Broker, queue: ForwardQueue | None) -> dict[str, int]:
    """Messages dropped or refused, as ``"<where>: <reason>"`` -> count: the broker's
    counters and the forward queue's drops by reason summed over the classes (the series of
    ``rapidmq_messages_dropped_total``, without the class label)."""
    st = broker.stats
    out = {f"{path}: {reason}": int(getattr(st, attr, 0))
           for attr, (path, reason) in BROKER_DROPS.items()}
    if queue is not None:
        for (reason, _prio), n in sorted(queue.class_drops.items()):
            key = f"forward: {reason}"
            out[key] = out.get(key, 0) + n
    return out
