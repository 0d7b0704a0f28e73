"""Each tenant's own ``$SYS`` view: ``<mountpoint>$SYS/broker/...`` (e.g.
``tenants/acme/$SYS/broker/clients/connected``), published (retained, not stored) every
``sys_interval`` seconds. A tenant's clients may not subscribe to the gateway's ``$SYS/#``
(it describes every tenant); this view counts only their own clients, sessions,
subscriptions and retained messages, under their mountpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..broker.broker import Broker

__all__ = ["publish_tenant_sys", "tenant_stats", "tenant_sys_values"]

TenantOf = Callable[[str | None], str | None]


def tenant_stats(broker: Broker, tenant_of: TenantOf, mountpoint: str,
                 known: set[str] | None = None) -> dict[str, list[int]]:
    """tenant -> [clients connected, sessions, subscriptions, retained messages] of every
    tenant with a session (and those in ``known``, which gains the ones seen)."""
    stats: dict[str, list[int]] = {t: [0, 0, 0, 0] for t in known or ()}
    for s in broker.sessions.values():
        t = tenant_of(s.username)
        if t is None:
            continue
        row = stats.setdefault(t, [0, 0, 0, 0])
        row[0] += s.link is not None
        row[1] += 1
        row[2] += len(s.subscriptions)
    mounts = {t: mountpoint.replace("${tenant}", t) for t in stats}
    for topic in broker.retained:
        for t, mount in mounts.items():
            if topic.startswith(mount):
                stats[t][3] += 1
                break
    if known is not None:
        known.update(stats)
    return stats


def tenant_sys_values(broker: Broker, tenant_of: TenantOf, mountpoint: str,
                      known: set[str] | None = None) -> dict[str, bytes]:
    """Topic -> payload of every tenant with a session (and those in ``known``)."""
    out: dict[str, bytes] = {}
    for t, (connected, sessions, subs, retained) in tenant_stats(
            broker, tenant_of, mountpoint, known).items():
        base = f"{mountpoint.replace('${tenant}', t)}$SYS/broker/"
        out[base + "clients/connected"] = str(connected).encode()
        out[base + "sessions"] = str(sessions).encode()
        out[base + "subscriptions/count"] = str(subs).encode()
        out[base + "retained messages/count"] = str(retained).encode()
    return out


async def publish_tenant_sys(broker: Broker, tenant_of: TenantOf, mountpoint: str,
                             interval: float) -> None:
    """Publish every tenant's view every ``interval`` seconds until cancelled."""
    known: set[str] = set()
    while True:
        for topic, payload in tenant_sys_values(broker, tenant_of, mountpoint, known).items():
            broker.publish_internal(topic, payload)
        await asyncio.sleep(interval)
