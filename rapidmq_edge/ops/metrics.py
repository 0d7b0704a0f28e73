"""``/metrics``: the gateway in the Prometheus text format (OpenMetrics on request).

Produced by ``prometheus_client``: :class:`LiveCollector` reads the gateway's own counters
and snapshots at scrape time (nothing is copied on the message path); three histograms are
observed where the time is measured (the forward queue's group commit, the event loop's
lag, the intelligence's scoring of a batch); ``ProcessCollector`` adds RSS, open fds and
CPU. The series and what they mean are listed in ``docs/operations.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..broker.broker import Broker
from ..config.forwarding import PRIORITIES
from ..store.disk import DiskSpace
from ..uplink.client import UplinkClient
from .process_stats import LoopLag

__all__ = ["GatewayMetrics", "MetricSources", "class_name"]

#: priority number -> class name (labels); -1: not known (a salvaged row)
_CLASS = {v: k for k, v in PRIORITIES.items()}

#: the broker's drop counters (``Stats`` field -> (path, reason))
_BROKER_DROPS = {
    "acl_denied": ("ingress", "acl_denied"),
    "too_large": ("ingress", "too_large"),
    "malformed": ("ingress", "malformed"),
    "publish_dropped": ("local", "queue_full"),
    "no_subscribers": ("local", "no_subscribers"),
}

COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
INFERENCE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                     0.05, 0.1)


def class_name(priority: int) -> str:
    """The ``class`` label of a priority number (``unknown`` for -1)."""
    return _CLASS.get(priority, "unknown")


@dataclass(slots=True)
class MetricSources:
    """What the collector reads; every part but the broker is optional (not configured)."""

    gateway_id: str
    broker: Broker
    loop_lag: LoopLag
    disk: DiskSpace | None = None
    #: live connections as (protocol, listener) -> count
    connections: Callable[[], Mapping[tuple[str, str], int]] = dict
    #: messages the HTTP API and the gateway itself published, by QoS: protocol -> [q0, q1, q2]
    published_by: Callable[[], Mapping[str, Sequence[int]]] = dict
    queue: Any = None  # store.forward_queue.ForwardQueue
    uplinks: Sequence[UplinkClient] = ()
    forward_status: Any = None  # ops.forwarding_status.ForwardingStatus (its forecast)
    protect: Any = None  # pipeline.protect.Protector
    intelligence: Any = None  # pipeline.intelligence_runtime.IntelligenceRuntime
    #: the OTA integrator's hook: one dict of string labels per component, e.g.
    #: ``{"component": "priority", "state": "shadow", "version": "2"}``
    ota_components: Callable[[], Iterable[Mapping[str, str]]] = list
    #: tenant -> [clients connected, sessions, subscriptions, retained messages]
    tenants: Callable[[], Mapping[str, Sequence[int]]] = dict
    started: float = field(default_factory=time.time)


class LiveCollector(Collector):
    """Reads :class:`MetricSources` at each scrape."""

    def __init__(self, src: MetricSources) -> None:
        self.src = src

    def describe(self) -> list[Metric]:
        return []  # the series depend on the configuration: not described up front

    def collect(self) -> Iterable[Metric]:
        src = self.src
        yield InfoMetricFamily("rapidmq_build", "Gateway version and id.",
                               value={"version": __version__, "gateway": src.gateway_id})
        yield GaugeMetricFamily("rapidmq_start_time_seconds",
                                "When the gateway started (Unix time).", value=src.started)
        yield from self._broker()
        yield from self._forwarding()
        if src.intelligence is not None:
            yield from self._intelligence(src.intelligence)
        if src.protect is not None:
            yield from self._crypto(src.protect.status())
        yield from self._ota()
        yield from self._tenants()
        yield from self._process()

    def _tenants(self) -> Iterable[Metric]:
        stats = self.src.tenants()
        if not stats:
            return
        for i, (name, text) in enumerate((
                ("rapidmq_tenant_clients_connected", "Connected clients of the tenant."),
                ("rapidmq_tenant_sessions", "Sessions of the tenant's clients."),
                ("rapidmq_tenant_subscriptions", "Subscriptions of the tenant's clients."),
                ("rapidmq_tenant_retained_messages", "Retained messages under the tenant's "
                                                     "mountpoint."))):
            fam = GaugeMetricFamily(name, text, labels=["tenant"])
            for tenant, row in sorted(stats.items()):
                fam.add_metric([tenant], row[i])
            yield fam

    # -- broker --------------------------------------------------------------------

    def _broker(self) -> Iterable[Metric]:
        b = self.src.broker
        st = b.stats
        conns = GaugeMetricFamily("rapidmq_connections", "Open client connections.",
                                  labels=["protocol", "listener"])
        for (proto, listener), n in sorted(self.src.connections().items()):
            conns.add_metric([proto, listener], n)
        yield conns
        yield CounterMetricFamily("rapidmq_connections_opened",
                                  "MQTT connections accepted since start.",
                                  value=st.connections_total)
        yield GaugeMetricFamily("rapidmq_sessions", "MQTT sessions (connected or persistent).",
                                value=len(b.sessions))
        yield GaugeMetricFamily("rapidmq_retained_messages", "Retained messages held.",
                                value=len(b.retained))
        yield GaugeMetricFamily("rapidmq_subscriptions", "Subscriptions held.",
                                value=b.index.count)
        rec = CounterMetricFamily(
            "rapidmq_messages_received",
            "Messages published into the broker, by protocol and QoS (protocol mqtt also "
            "counts the gateway's own alerts).", labels=["protocol", "qos"])
        other = list(st.received_by_qos)
        for proto, counts in sorted(self.src.published_by().items()):
            for q, n in enumerate(counts):
                rec.add_metric([proto, str(q)], n)
                other[q] -= n
        for q, n in enumerate(other):
            rec.add_metric(["mqtt", str(q)], max(0, n))
        yield rec
        sent = CounterMetricFamily("rapidmq_messages_sent",
                                   "Messages delivered to MQTT subscribers, by QoS.",
                                   labels=["protocol", "qos"])
        for q, n in enumerate(st.sent_by_qos):
            sent.add_metric(["mqtt", str(q)], n)
        yield sent
        yield _counter("rapidmq_received_bytes", "Bytes read from MQTT clients.",
                       [(["mqtt"], st.bytes_received)], ["protocol"])
        yield _counter("rapidmq_sent_bytes", "Bytes written to MQTT clients.",
                       [(["mqtt"], st.bytes_sent)], ["protocol"])
        yield CounterMetricFamily(
            "rapidmq_publish_rate_limited",
            "Times a publisher was paused by its publish rate limit (delayed, not lost).",
            value=st.rate_limited)
        drops = CounterMetricFamily(
            "rapidmq_messages_dropped",
            "Messages dropped or refused, by where (ingress, local delivery, forward queue), "
            "priority class and reason.", labels=["path", "class", "reason"])
        for attr, (path, reason) in _BROKER_DROPS.items():
            drops.add_metric([path, "", reason], getattr(st, attr))
        q = self.src.queue
        if q is not None:
            for (reason, prio), n in sorted(q.class_drops.items()):
                drops.add_metric(["forward", class_name(prio), reason], n)
        yield drops

    # -- store-and-forward ---------------------------------------------------------

    def _forwarding(self) -> Iterable[Metric]:
        q = self.src.queue
        if q is None:
            return
        stats = q.stats()
        labels = ["upstream", "class"]
        depth = GaugeMetricFamily("rapidmq_forward_queue_messages",
                                  "Messages queued for an upstream.", labels=labels)
        size = GaugeMetricFamily("rapidmq_forward_queue_bytes",
                                 "Bytes queued for an upstream.", labels=labels)
        age = GaugeMetricFamily("rapidmq_forward_queue_oldest_age_seconds",
                                "Age of the oldest queued message.", labels=labels)
        for up, lanes in sorted(stats["upstreams"].items()):
            for prio, lane in sorted(lanes.items()):
                key = [up, class_name(prio)]
                depth.add_metric(key, lane["messages"])
                size.add_metric(key, lane["bytes"])
                age.add_metric(key, lane["oldest_age"])
        yield from (depth, size, age)
        yield CounterMetricFamily("rapidmq_forward_queue_commits",
                                  "Group commits of the forward queue.", value=stats["commits"])
        yield CounterMetricFamily("rapidmq_forward_queue_commit_failures",
                                  "Failed group commits.", value=stats["commit_failures"])
        ups = self.src.uplinks
        up_state = GaugeMetricFamily("rapidmq_upstream_up",
                                     "1 when the upstream link is connected.", labels=["upstream"])
        rtt = GaugeMetricFamily("rapidmq_upstream_rtt_seconds",
                                "Heartbeat round trip through the upstream.",
                                labels=["upstream"])
        inflight = GaugeMetricFamily("rapidmq_upstream_in_flight",
                                     "Messages sent upstream and not yet acknowledged.",
                                     labels=["upstream"])
        for c in ups:
            up_state.add_metric([c.name], 1.0 if c.connected else 0.0)
            if c.heartbeat_rtt_ms is not None:
                rtt.add_metric([c.name], c.heartbeat_rtt_ms / 1000.0)
            inflight.add_metric([c.name], c.inflight)
        yield from (up_state, rtt, inflight)
        for name, attr, text in (
            ("rapidmq_upstream_sent", "sent", "Messages sent upstream."),
            ("rapidmq_upstream_acked", "acked", "Messages the upstream acknowledged."),
            ("rapidmq_upstream_failovers", "failovers", "Switches to another upstream URL."),
            ("rapidmq_upstream_reconnects", "reconnects", "Reconnections to the upstream."),
        ):
            yield _counter(name, text, [([c.name], getattr(c, attr)) for c in ups],
                           ["upstream"])
        fs = self.src.forward_status
        if fs is not None:
            eta = GaugeMetricFamily(
                "rapidmq_forward_drain_eta_seconds",
                "Forecast time until the upstream's backlog drains (absent: not draining "
                "or not known yet).", labels=["upstream"])
            forecast = fs._forecast(stats, time.monotonic())  # noqa: SLF001 - its own view
            for name, fc in sorted(forecast["upstreams"].items()):
                if fc and fc.get("drains_in_s") is not None:
                    eta.add_metric([name], float(fc["drains_in_s"]))
            yield eta

    # -- intelligence, crypto, OTA -------------------------------------------------

    def _intelligence(self, rt: Any) -> Iterable[Metric]:
        yield CounterMetricFamily("rapidmq_intelligence_scored_messages",
                                  "Messages scored by the intelligence.", value=rt.scored)
        alerts = CounterMetricFamily("rapidmq_intelligence_alerts",
                                     "Alerts published, by kind and state (open / close).",
                                     labels=["kind", "state"])
        for (kind, state), n in sorted(getattr(rt, "alerts_by_kind", {}).items()):
            alerts.add_metric([kind, state], n)
        yield alerts
        inc = rt.incidents
        yield GaugeMetricFamily("rapidmq_intelligence_incidents_open",
                                "Anomaly incidents open now.", value=len(inc.open))
        yield CounterMetricFamily("rapidmq_intelligence_incidents_opened",
                                  "Anomaly incidents opened.", value=inc.opened)
        models = InfoMetricFamily("rapidmq_intelligence_model", "Models in use.",
                                  labels=["model"])
        for name, m in rt.snapshot()["models"].items():
            models.add_metric([name], {"version": str(m.get("version")),
                                       "source": str(m.get("source")),
                                       "fallback": str(bool(m.get("fallback"))).lower()})
        yield models

    def _crypto(self, status: Mapping[str, Any]) -> Iterable[Metric]:
        yield CounterMetricFamily("rapidmq_crypto_batches_signed",
                                  "Post-quantum signed batches sealed.",
                                  value=status["sealed_batches"])
        yield _counter("rapidmq_crypto_sessions", "Encryption sessions started.",
                       [([up], n) for up, n in sorted(status["sessions"].items())],
                       ["upstream"])

    def _ota(self) -> Iterable[Metric]:
        comps = list(self.src.ota_components())
        if not comps:
            return
        info = InfoMetricFamily("rapidmq_ota_component", "OTA state per component.")
        for c in comps:
            info.add_metric([], {k: str(v) for k, v in c.items()})
        yield info

    # -- process -------------------------------------------------------------------

    def _process(self) -> Iterable[Metric]:
        disk = self.src.disk
        if disk is not None:
            snap = disk.snapshot()
            yield GaugeMetricFamily("rapidmq_disk_free_bytes",
                                    "Free bytes on the data directory's disk.",
                                    value=snap["free_bytes"])
            yield GaugeMetricFamily("rapidmq_disk_reserve_bytes",
                                    "Reserve below which new forwarded messages are refused.",
                                    value=snap["reserve_bytes"])


def _counter(name: str, text: str, values: Sequence[tuple[list[str], float]],
             labels: list[str]) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, text, labels=labels)
    for key, v in values:
        fam.add_metric(key, v)
    return fam


class GatewayMetrics:
    """One gateway's registry: the live collector, the histograms, the process collector."""

    def __init__(self, sources: MetricSources) -> None:
        disable_created_metrics()  # no ``*_created`` series beside every counter
        self.sources = sources
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.loop_lag_seconds = Histogram(
            "rapidmq_event_loop_lag_seconds", "How late the event loop runs a 100 ms timer.",
            buckets=LAG_BUCKETS, registry=r)
        sources.loop_lag.on_sample = self.loop_lag_seconds.observe
        if sources.queue is not None:
            self.commit_seconds = Histogram(
                "rapidmq_forward_queue_commit_seconds",
                "Duration of the forward queue's group commits.", buckets=COMMIT_BUCKETS,
                registry=r)
            sources.queue.commit_observer = self.commit_seconds.observe
        if hasattr(sources.intelligence, "inference_observer"):
            self.inference_seconds = Histogram(
                "rapidmq_intelligence_inference_seconds", "Scoring time of one micro-batch.",
                buckets=INFERENCE_BUCKETS, registry=r)
            sources.intelligence.inference_observer = self.inference_seconds.observe
        ProcessCollector(registry=r)
        r.register(LiveCollector(sources))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a request's ``Accept`` header: (body, content type)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
