"""``$SYS/broker/...`` statistics, published (retained) every ``sys_interval`` seconds."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from ..broker.broker import Broker


def sys_values(broker: Broker) -> dict[str, str]:
    """The current statistics, as topic suffix -> text payload (Mosquitto's names)."""
    st = broker.stats
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "version": f"rapidmq-edge {__version__}",
        "uptime": f"{int(time.time() - st.started)} seconds",
        "clients/connected": str(st.clients_connected),
        "clients/total": str(len(broker.sessions)),
        "clients/disconnected": str(len(broker.sessions) - st.clients_connected),
        "clients/maximum": str(st.clients_maximum),
        "connections/total": str(st.connections_total),
        "messages/received": str(st.messages_received),
        "messages/sent": str(st.messages_sent),
        "publish/messages/dropped": str(st.publish_dropped),
        "bytes/received": str(st.bytes_received),
        "bytes/sent": str(st.bytes_sent),
        "subscriptions/count": str(broker.index.count),
        "retained messages/count": str(len(broker.retained)),
        "store/pending": str(broker.store.pending if broker.store else 0),
        "heap/maximum": str(rss_kb * 1024),
    }


def flatten(prefix: str, value: Any, typed: bool = False) -> dict[str, str]:
    """A status snapshot as ``$SYS/broker/...`` topic suffixes and payloads: nested tables
    become topic levels, None an empty payload; ``typed`` writes booleans as ``true`` /
    ``false`` and lists as JSON (else ``str()``)."""
    out: dict[str, str] = {}

    def walk(path: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                walk(f"{path}/{k}", item)
        elif v is None:
            out[path] = ""
        elif typed and isinstance(v, bool):
            out[path] = "true" if v else "false"
        elif typed and isinstance(v, list):
            out[path] = json.dumps(v)
        else:
            out[path] = str(v)

    walk(prefix, value)
    return out


async def publish_sys(
    broker: Broker, interval: float, extra: Sequence[Callable[[], dict[str, str]]] = ()
) -> None:
    """Publish ``$SYS/broker/...`` (plus the values of each ``extra()``: the forwarding's,
    the intelligence's) every ``interval`` seconds."""
    while True:
        values = sys_values(broker)
        for more in extra:
            values.update(more())
        for name, value in values.items():
            broker.publish_internal(f"$SYS/broker/{name}", value.encode())
        await asyncio.sleep(interval)
