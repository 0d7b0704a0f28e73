"""What a gateway says about its models, and how the operator reads it (sans I/O).

Each gateway keeps one retained JSON document per component on
``{prefix}/state/<gateway>/<component>`` and one for itself on ``{prefix}/state/<gateway>``
(``{"online": true, "class": ..., "version": ...}``; its will replaces it with
``{"online": false}``). A component's document::

    {"component": "priority", "state": "shadow", "sequence": 8, "version": "1.3.0",
     "active": {"sequence": 7, "version": "1.2.0", "source": "ota"},
     "progress": 1.0, "shadow": {"agreement": 0.993, "messages": 812, ...},
     "reason": null, "at": 1796000000.0}

``state`` is one of :data:`STATES`; ``sequence``/``version`` name the update the state is
about, ``active`` what scores messages now.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .rollout import GatewayReport

__all__ = ["STATES", "ComponentState", "FleetView", "component_topic", "gateway_topic"]

#: the states of one component's update, in the order they come
STATES = ("idle", "downloading", "validating", "shadow", "active", "rejected", "rolled-back")


def gateway_topic(prefix: str, gateway_id: str) -> str:
    """The gateway's own retained presence document."""
    return f"{prefix}/state/{gateway_id}"


def component_topic(prefix: str, gateway_id: str, component: str) -> str:
    """The retained state document of one component on one gateway."""
    return f"{prefix}/state/{gateway_id}/{component}"


@dataclass
class ComponentState:
    """One component's update state on this gateway (see the module docstring)."""

    component: str
    state: str = "idle"
    sequence: int | None = None
    version: str | None = None
    active: dict[str, Any] = field(default_factory=dict)
    progress: float | None = None
    shadow: dict[str, Any] | None = None
    reason: str | None = None
    at: float = 0.0

    def set(self, state: str, *, reason: str | None = None, now: float | None = None,
            **changes: Any) -> None:
        """Move to ``state`` (one of :data:`STATES`) with ``changes`` to the other fields."""
        if state not in STATES:
            raise ValueError(f"unknown OTA state {state!r}")
        self.state = state
        self.reason = reason
        for k, v in changes.items():
            setattr(self, k, v)
        self.at = time.time() if now is None else now

    def to_json(self) -> bytes:
        """The retained document."""
        doc = {"component": self.component, "state": self.state, "sequence": self.sequence,
               "version": self.version, "active": self.active,
               "progress": None if self.progress is None else round(self.progress, 4),
               "shadow": self.shadow, "reason": self.reason, "at": round(self.at, 3)}
        return json.dumps(doc, separators=(",", ":")).encode()


@dataclass
class FleetView:
    """The operator's picture of a fleet, from the retained state documents."""

    prefix: str
    gateways: dict[str, dict[str, Any]] = field(default_factory=dict)  # presence documents
    components: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def take(self, topic: str, payload: bytes) -> bool:
        """Take one message of ``{prefix}/state/#``; False when it is not one (ignored)."""
        head = f"{self.prefix}/state/"
        if not topic.startswith(head):
            return False
        parts = topic[len(head):].split("/")
        try:
            doc = json.loads(payload) if payload else None
        except ValueError:
            return False
        if doc is not None and not isinstance(doc, dict):
            return False
        if len(parts) == 1 and parts[0]:
            if doc is None:
                self.gateways.pop(parts[0], None)
            else:
                self.gateways[parts[0]] = doc
            return True
        if len(parts) == 2 and all(parts):
            if doc is None:
                self.components.pop((parts[0], parts[1]), None)
            else:
                self.components[(parts[0], parts[1])] = doc
            return True
        return False

    def members(self, gateway_class: str | None = None) -> list[str]:
        """Gateway ids seen (of ``gateway_class``), online or not."""
        return sorted(g for g, d in self.gateways.items()
                      if gateway_class is None or d.get("class") == gateway_class)

    def reports(self, component: str) -> list[GatewayReport]:
        """Every gateway's last word on ``component``, for a :class:`~.rollout.Rollout`."""
        out = []
        for (gw, comp), d in self.components.items():
            if comp == component:
                seq = d.get("sequence")
                out.append(GatewayReport(gw, str(d.get("state", "")),
                                         seq if isinstance(seq, int) else None,
                                         d.get("reason")))
        return out

    def table(self, components: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """One row per gateway and component: the fleet table of ``ota status``."""
        wanted = set(components) if components is not None else None
        rows = []
        for gw in sorted(set(self.gateways) | {g for g, _ in self.components}):
            pres: Mapping[str, Any] = self.gateways.get(gw, {})
            comps = sorted(c for g, c in self.components if g == gw
                           and (wanted is None or c in wanted))
            for comp in comps or [""]:
                d = self.components.get((gw, comp), {})
                active = d.get("active") or {}
                shadow = d.get("shadow") or {}
                rows.append({
                    "gateway": gw, "online": bool(pres.get("online", False)),
                    "class": pres.get("class"), "component": comp or None,
                    "state": d.get("state"), "sequence": d.get("sequence"),
                    "active_sequence": active.get("sequence"),
                    "active_version": active.get("version"),
                    "progress": d.get("progress"), "agreement": shadow.get("agreement"),
                    "reason": d.get("reason")})
        return rows
