"""``[[retention]]``: the longest a message on matching topics is kept, per topic filter
(and tenant)."""

from __future__ import annotations

from dataclasses import dataclass

from ..mqtt.topics import valid_topic_filter
from .checks import Table, config_error, items, show, string

__all__ = ["RetentionRule", "parse_retention"]


@dataclass(frozen=True, slots=True)
class RetentionRule:
    """Messages on topics matching ``filter`` are kept at most ``retention_s`` seconds.

    With ``tenant`` the filter is under that tenant's mountpoint (``[auth]
    tenant_mountpoint``, e.g. ``tenants/acme/`` + ``sensors/#``)."""

    filter: str
    retention_s: float
    tenant: str | None = None


def _seconds(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise config_error(where, f"must be a number of seconds > 0, got {show(value)}")
    return float(value)


def _rule(data: object, key: str) -> RetentionRule:
    t = Table(data, key, ("filter", "retention_s", "tenant"))
    for name in ("filter", "retention_s"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    filt = t.get("filter", string, "")
    if not valid_topic_filter(filt) or filt.startswith("$share/"):
        raise config_error(t.sub("filter"), f"must be an MQTT topic filter, got {show(filt)}")
    tenant = t.get("tenant", string, "") or None
    if tenant is not None and any(c in tenant for c in "/+#$"):
        raise config_error(t.sub("tenant"), f"must be a tenant name, got {show(tenant)}")
    return RetentionRule(filt, t.get("retention_s", _seconds, 0.0), tenant)


def parse_retention(value: object) -> tuple[RetentionRule, ...]:
    if not isinstance(value, list):
        raise config_error("retention", f"must be an array of tables ([[retention]]), "
                                        f"got {show(value)}")
    return tuple(items(value, _rule, "retention"))
