"""The store-and-forward half of the gateway, built from ``[[upstream]]``, ``[[forward]]``,
``[[downstream]]``, ``[queue]`` and ``[security]``: the durable queue, the protection, the
forwarder (the pipeline side, built before the broker) and one uplink client per upstream
with its downstream rules (built after it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.forwarding import ForwardingSettings
from ..pipeline.forwarder import Forwarder
from ..store.disk import DiskSpace
from ..store.forward_queue import ClassLimits, ForwardQueue
from ..uplink.backoff import Backoff
from ..uplink.client import MessageCallback, UplinkClient
from ..uplink.endpoint_policy import make_policy

__all__ = ["ForwardPath", "build_forward_path", "build_uplinks"]


@dataclass(slots=True)
class ForwardPath:
    """The durable queue, the protection of ``encrypt``/``sign`` rules (or None) and the
    forwarder that applies ``[[forward]]`` rules into them."""

    queue: ForwardQueue
    protect: Any  # pipeline.protect.Protector or None
    forwarder: Forwarder


def build_forward_path(gateway_id: str, settings: ForwardingSettings, data_dir: Path,
                       disk: DiskSpace | None = None) -> ForwardPath:
    """Open ``data_dir/forward.db`` (refusing new messages when ``disk`` is below its
    reserve) and build the protection and the forwarder on it."""
    q = settings.queue
    classes = {n: ClassLimits(c.max_messages, c.max_bytes, c.max_age, c.policy)
               for n, c in q.classes.items()}
    queue = ForwardQueue(data_dir / "forward.db", q.durability, q.commit_delay_ms / 1000,
                         classes, q.max_bytes, disk=disk)
    protect = None
    if any(r.encrypt or r.sign for r in settings.forward):
        from ..pipeline.protect import make_protector  # the crypto stack: only when used

        protect = make_protector(gateway_id, settings.forward, settings.upstreams,
                                 settings.security, queue, data_dir)
    forwarder = Forwarder(gateway_id, settings.forward, settings.upstreams, queue, protect)
    return ForwardPath(queue, protect, forwarder)


def build_uplinks(
    gateway_id: str, settings: ForwardingSettings, queue: ForwardQueue,
    downstream: Callable[[str], tuple[Sequence[tuple[str, int]], MessageCallback | None]],
) -> list[UplinkClient]:
    """One uplink client per ``[[upstream]]``, draining ``queue``; ``downstream(name)`` gives
    an upstream's subscriptions and the handler of what arrives on them."""
    def sub(text: str) -> str:
        return text.replace("{gateway_id}", gateway_id)

    uplinks = []
    for up in settings.upstreams:
        subscriptions, on_message = downstream(up.name)
        uplinks.append(UplinkClient(
            up.name, up.urls, sub(up.client_id), queue,
            version=up.protocol, username=up.username, password=up.password,
            keep_alive=up.keep_alive, window=up.window, tls=up.client_tls(),
            subscriptions=subscriptions, on_message=on_message, gateway_id=gateway_id,
            rate_limit=up.rate_limit,
            heartbeat_topic=sub(up.topic_prefix) + "_heartbeat",
            heartbeat_interval=up.heartbeat_interval,
            policy=make_policy(up.endpoint_policy, up.urls, dwell=up.endpoint_dwell),
            backoff=Backoff(maximum=up.reconnect_max_s),
        ))
    return uplinks


