"""Configuration of the operator's view: ``[metrics]``, ``[health]`` and ``[fleet]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checks import Table, boolean, config_error, float_range, string
from .ingress import Endpoint
from .ingress import _endpoints as parse_endpoints  # the [http] listen checker

__all__ = [
    "DEFAULT_FLEET_TOPIC", "FleetSettings", "HealthSettings", "MetricsSettings", "parse_fleet",
    "parse_health", "parse_metrics",
]


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``[metrics]``: ``/metrics`` on the HTTP API's listener and, with ``listen``, on its
    own (which also answers ``/livez`` and ``/readyz``); ``auth``: a bearer token of
    ``[http] tokens_file`` is required."""

    enabled: bool = True
    listen: tuple[Endpoint, ...] = ()
    auth: bool = False


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """``[health]``: ``/readyz`` also requires an upstream link up when
    ``require_upstream``; systemd's watchdog is pinged every ``watchdog_fraction`` of
    ``WatchdogSec=``."""

    require_upstream: bool = False
    watchdog_fraction: float = 0.5


#: where each gateway's status goes on its upstream (``{gateway_id}`` is replaced)
DEFAULT_FLEET_TOPIC = "rapidmq/fleet/{gateway_id}"


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """``[fleet]``: a retained status on ``topic`` of the upstream ``upstream`` (default:
    the first) every ``interval_s``, ``{"state": "offline"}`` as the link's will."""

    enabled: bool = False
    topic: str = DEFAULT_FLEET_TOPIC
    interval_s: float = 30.0
    upstream: str = ""


def parse_metrics(data: object) -> MetricsSettings:
    """Validate ``[metrics]``."""
    t = Table(data, "metrics", ("enabled", "listen", "auth"))
    return MetricsSettings(
        enabled=t.get("enabled", boolean, True),
        listen=t.get("listen", lambda k, v: parse_endpoints(k, v, ("http",)), ()),
        auth=t.get("auth", boolean, False),
    )


def parse_health(data: object) -> HealthSettings:
    """Validate ``[health]``."""
    t = Table(data, "health", ("require_upstream", "watchdog_fraction"))
    return HealthSettings(
        require_upstream=t.get("require_upstream", boolean, False),
        watchdog_fraction=t.get("watchdog_fraction", float_range(0.05, 0.9), 0.5),
    )


def parse_fleet(data: object, upstreams: list[str]) -> FleetSettings:
    """Validate ``[fleet]`` (``upstreams``: the configured upstream names)."""
    t = Table(data, "fleet", ("enabled", "topic", "interval_s", "upstream"))
    s = FleetSettings(
        enabled=t.get("enabled", boolean, False),
        topic=t.get("topic", string, DEFAULT_FLEET_TOPIC),
        interval_s=t.get("interval_s", float_range(1.0, 86400.0), 30.0),
        upstream=t.get("upstream", string, ""),
    )
    if not s.topic or any(c in s.topic for c in "+#\x00"):
        raise config_error("fleet.topic", f"must be a topic name without wildcards, got "
                           f"{s.topic!r}")
    if s.enabled and not upstreams:
        raise config_error("fleet.enabled", "needs an [[upstream]] to publish to")
    if s.upstream and s.upstream not in upstreams:
        raise config_error("fleet.upstream", f"no [[upstream]] named {s.upstream!r}")
    return s
