"""Store-and-forward assembled: durable queue → one UplinkClient per ``[[upstream]]``.

Downstream rules bring upstream (cloud → device) topics back into the local broker.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..broker.broker import Broker
from ..broker.message import Message, PublishRefused
from ..config.forwarding import PRIORITIES, DownstreamRule, ForwardingSettings, UpstreamSettings
from ..mqtt.topics import topic_matches
from ..ops.forecast import CapacityForecaster, LaneBounds, disk_free
from ..pipeline.forwarder import DOWNSTREAM_ORIGIN, Forwarder
from ..store.forward_queue import ClassLimits, ForwardQueue, QueuedMessage
from .backoff import Backoff
from .client import UplinkClient
from .endpoint_policy import make_policy

log = logging.getLogger(__name__)


class QueueSource:
    """Adapts :class:`ForwardQueue` to the uplink client's source interface."""

    def __init__(self, queue: ForwardQueue) -> None:
        self.queue = queue

    def fetch(self, upstream: str, limit: int) -> list[QueuedMessage]:
        return self.queue.fetch(upstream, limit)  # has the fields of an Outgoing

    def ack(self, upstream: str, ids: list[int]) -> None:
        self.queue.ack(upstream, ids)

    def requeue(self, upstream: str, ids: list[int]) -> None:
        self.queue.requeue(upstream, ids)

    def drop(self, upstream: str, ids: list[int], reason: str) -> None:
        self.queue.drop(upstream, ids, reason)

    async def wait_for_data(self, upstream: str) -> None:
        """Return once committed messages are ready (the queue wakes us at commit)."""
        await self.queue.wait_for_data(upstream)


def _tls_context(up: UpstreamSettings) -> ssl.SSLContext | None:
    if not any(u.startswith("mqtts://") for u in up.urls):
        return None
    ctx = ssl.create_default_context(cafile=str(up.ca_file) if up.ca_file else None)
    if up.cert is not None and up.key is not None:
        ctx.load_cert_chain(str(up.cert), str(up.key))
    return ctx


def _local_topic(rule: DownstreamRule, topic: str) -> str | None:
    if rule.strip_prefix:
        if not topic.startswith(rule.strip_prefix):
            return None
        topic = topic[len(rule.strip_prefix):]
    return rule.local_prefix + topic if topic else None


class StoreAndForward:
    """The durable queue, the forwarding tap and the uplinks of one gateway."""

    def __init__(
        self, gateway_id: str, settings: ForwardingSettings, data_dir: Path, broker: Broker
    ) -> None:
        self.gateway_id = gateway_id
        self.settings = settings
        self.broker = broker
        q = settings.queue
        classes = {
            n: ClassLimits(c.max_messages, c.max_bytes, c.max_age, c.policy)
            for n, c in q.classes.items()
        }
        self.queue = ForwardQueue(
            data_dir / "forward.db", q.durability, q.commit_delay_ms / 1000, classes, q.max_bytes
        )
        self.source = QueueSource(self.queue)
        # the queue itself (StoreAndForward.put is the same call, one hop longer)
        self.forwarder = Forwarder(gateway_id, settings.forward, settings.upstreams, self.queue)
        self.protect: Any = None  # pipeline.protect.Protector when a rule encrypts or signs
        if any(r.encrypt or r.sign for r in settings.forward):
            from ..pipeline.protect import make_protector  # the crypto stack: only when used

            self.protect = make_protector(
                gateway_id, settings.forward, settings.upstreams, settings.security, self.queue,
                data_dir,
            )
        self.forwarder.protect = self.protect
        broker.taps.append(self.forwarder)
        broker.durable.append(self.queue.commit_future)
        self.uplinks: list[UplinkClient] = []
        self._rates: dict[str, tuple[float, int]] = {}
        self.data_dir = data_dir
        self.forecaster = CapacityForecaster(
            {n: LaneBounds(c.max_messages, c.max_bytes, c.policy) for n, c in q.classes.items()},
            q.max_bytes,
        )
        self.tasks: list[asyncio.Task[None]] = []

    def _sub(self, text: str) -> str:
        return text.replace("{gateway_id}", self.gateway_id)

    def start(self) -> None:
        """Start one uplink per upstream (call inside the running loop)."""
        loop = asyncio.get_running_loop()
        if self.protect is not None:
            self.protect.start()
        for up in self.settings.upstreams:
            rules = [r for r in self.settings.downstream if r.upstream == up.name]
            client = UplinkClient(
                up.name, up.urls, self._sub(up.client_id), self.source,
                version=up.protocol, username=up.username, password=up.password,
                keep_alive=up.keep_alive, window=up.window, tls=_tls_context(up),
                subscriptions=[(self._sub(r.filter), r.qos) for r in rules],
                on_message=self._downstream(up.name, rules), gateway_id=self.gateway_id,
                rate_limit=up.rate_limit,
                heartbeat_topic=self._sub(up.topic_prefix) + "_heartbeat",
                heartbeat_interval=up.heartbeat_interval,
                policy=make_policy(up.endpoint_policy, up.urls, dwell=up.endpoint_dwell),
                backoff=Backoff(maximum=up.reconnect_max_s),
            )
            self.uplinks.append(client)
            self.tasks.append(loop.create_task(client.run()))
            log.info("forwarding to upstream %s via %s", up.name, ", ".join(up.urls))

    def _downstream(
        self, upstream: str, rules: Sequence[DownstreamRule]
    ) -> Any:
        subbed = [(r, self._sub(r.filter), self._sub(r.strip_prefix)) for r in rules]

        def deliver(topic: str, payload: bytes, qos: int, props: dict[str, Any]) -> None:
            for rule, filt, strip in subbed:
                if not topic_matches(filt, topic):
                    continue
                local = _local_topic(
                    DownstreamRule(rule.upstream, rule.filter, rule.qos, strip, rule.local_prefix),
                    topic,
                )
                if local is None:
                    continue
                expiry = props.pop("message_expiry_interval", None)
                msg = Message(
                    local, payload, min(qos, rule.qos), False, props,
                    time.time() + expiry if expiry is not None else None,
                    DOWNSTREAM_ORIGIN + upstream,
                )
                try:
                    self.broker.publish(msg)
                except PublishRefused as exc:
                    log.warning("downstream message on %s refused: %s", local, exc)
                return

        return deliver

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
            prev = self._rates.get(client.name)
            rate = 0.0
            if prev is not None and now > prev[0]:
                rate = max(0.0, (client.acked - prev[1]) / (now - prev[0]))
            if prev is None or now - prev[0] >= 5.0:
                self._rates[client.name] = (now, client.acked)
            upstreams[client.name] = {
                **client.status(),
                "queued": queued,
                "queued_bytes": sum(c["bytes"] for c in lanes.values()),
                "oldest_age": max((c["oldest_age"] for c in lanes.values()), default=0.0),
                "classes": {names.get(p, str(p)): c for p, c in lanes.items()},
                "drain_rate": round(rate, 1),
                "drain_eta_s": round(queued / rate, 1) if rate > 0 else None,
                "forecast": forecast["upstreams"].get(client.name),
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
        """Backlog and disk forecast (:mod:`rapidmq_edge.ops.forecast`) from queue stats."""
        try:
            free = disk_free(self.data_dir)
        except OSError:
            free = 0
        acked = {c.name: c.acked for c in self.uplinks}
        return self.forecaster.observe(now, stats, acked, free)

    def status(self) -> dict[str, str]:
        """The snapshot flattened to ``$SYS/broker/forward/...`` topic suffixes."""
        snap = self.snapshot()
        out: dict[str, str] = {}

        def flat(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    flat(f"{prefix}/{k}", v)
            else:
                out[prefix] = "" if value is None else str(value)

        flat("forward", snap)
        return out

    async def stop(self) -> None:
        """Stop the uplinks (in-flight messages stay queued), then close the queue."""
        for client in self.uplinks:
            try:
                await client.stop()
            except Exception:  # pragma: no cover - shutdown must go on
                log.exception("stopping uplink %s", client.name)
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        if self.protect is not None:
            await self.protect.stop()
        await self.queue.close()
