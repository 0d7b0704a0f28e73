"""The operator's view of one gateway, wired from its parts: ``/metrics``
(:mod:`rapidmq_edge.ops.metrics`), ``/livez`` and ``/readyz`` (:mod:`rapidmq_edge.ingress.
ops_http`) and the fleet status on the upstream (:mod:`rapidmq_edge.ops.fleet`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from ..config.operations import FleetSettings, HealthSettings, MetricsSettings
from ..mqtt.packets import Will
from ..ops.fleet import FleetPublisher, offline_payload
from ..ops.tenant_sys import tenant_stats
from ..security.tokens import TokenDB

if TYPE_CHECKING:  # aiohttp and prometheus_client: imported only with an HTTP listener
    from ..ingress.ops_http import OpsHooks, OpsServer
    from ..ops.metrics import GatewayMetrics
    from .assembly import Gateway

__all__ = ["OperatorView"]

log = logging.getLogger("rapidmq_edge")

#: /livez fails when the event loop's lag sampler has not run for this long (s)
LOOP_STALL = 10.0


class OperatorView:
    """Metrics, probes and the fleet status of ``gateway`` (built after its parts)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gw = gateway
        c = gw.config
        self.metrics_settings: MetricsSettings = getattr(c, "metrics", MetricsSettings())
        self.health: HealthSettings = getattr(c, "health", HealthSettings())
        self.fleet_settings: FleetSettings = getattr(c, "fleet", FleetSettings())
        self.serving = False  # set once start() has bound every listener
        self.created = time.monotonic()
        self.metrics: GatewayMetrics | None = None
        # /metrics is served only on an HTTP listener ([metrics] or [http] listen)
        if self.metrics_settings.enabled and (self.metrics_settings.listen or c.http.listen):
            from ..ops.metrics import GatewayMetrics, MetricSources

            fwd = gw.forward
            self.metrics = GatewayMetrics(MetricSources(
                gateway_id=c.gateway.id, broker=gw.broker, loop_lag=gw.loop_lag, disk=gw.disk,
                connections=self._connections, published_by=self._published_by,
                queue=fwd.queue if fwd is not None else None, uplinks=gw.uplinks,
                forward_status=gw.forward_status,
                protect=fwd.protect if fwd is not None else None,
                intelligence=gw.intelligence, tenants=self._tenants,
            ))
        self.fleet: FleetPublisher | None = None
        fs = self.fleet_settings
        if fs.enabled and gw.uplinks:
            client = next((u for u in gw.uplinks if u.name == fs.upstream), gw.uplinks[0])
            topic = fs.topic.replace("{gateway_id}", c.gateway.id)
            client.will = Will(topic, offline_payload(c.gateway.id), 1, True)
            self.fleet = FleetPublisher(client, topic, fs.interval_s, gw.snapshot)
        self.server: OpsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- what the endpoints read -------------------------------------------------------

    def _connections(self) -> dict[tuple[str, str], int]:
        gw = self.gw
        out: Counter[tuple[str, str]] = Counter(
            ("mqtt", conn.listener or "?") for conn in gw.registry.connections)
        if gw.http is not None and gw.http.streams:
            out[("http_sse", "http")] = len(gw.http.streams)
        return dict(out)

    def _published_by(self) -> dict[str, list[int]]:
        gw = self.gw
        out = {}
        if gw.http is not None:
            out["http"] = list(gw.http.published_by_qos)
        if gw.coap is not None:
            out["coap"] = gw.coap.published_by_qos()
        return out

    def alive(self) -> list[str]:
        """Empty while the event loop runs (its lag sampler ticked recently)."""
        tick = self.gw.loop_lag.last_tick or self.created
        stalled = time.monotonic() - tick
        return [f"event loop stalled for {stalled:.1f} s"] if stalled > LOOP_STALL else []

    def ready(self) -> list[str]:
        """Empty when the gateway serves: store recovered, listeners up and (with
        ``[health] require_upstream``) an upstream link up; else the reasons."""
        gw = self.gw
        reasons = []
        if not self.serving:
            reasons.append("starting: store recovery or listeners not finished")
        elif not gw.servers:
            reasons.append("no MQTT listener is bound")
        if self.health.require_upstream and gw.uplinks and not any(
                u.connected for u in gw.uplinks):
            reasons.append("no upstream link is up: " + ", ".join(
                f"{u.name} ({u.last_error or 'connecting'})" for u in gw.uplinks))
        return reasons

    def set_ota_components(self, source: Callable[[], Iterable[Mapping[str, str]]]) -> None:
        """The OTA integration's hook: ``source()`` gives one dict of string labels per
        component (e.g. ``{"component": "priority", "state": "shadow", "version": "3"}``),
        exported as ``rapidmq_ota_component_info``."""
        if self.metrics is not None:
            self.metrics.sources.ota_components = source

    def _tenants(self) -> dict[str, list[int]]:
        """Per-tenant counts for ``/metrics`` (none without tenants)."""
        tenants = self.gw.access.tenants
        if tenants is None:
            return {}
        return tenant_stats(self.gw.broker, tenants.tenant_of, tenants.mountpoint)

    def hooks(self) -> OpsHooks:
        """The callables ``/metrics``, ``/livez`` and ``/readyz`` answer from."""
        from ..ingress.ops_http import OpsHooks

        m = self.metrics
        return OpsHooks(m.render if m is not None else None, self.metrics_settings.auth,
                        self.ready, self.alive)

    # -- running -------------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Bind ``[metrics] listen`` (if set), start the fleet status; the bound URLs."""
        urls: list[str] = []
        ms = self.metrics_settings
        if ms.listen:
            from ..ingress.ops_http import OpsServer

            tf = self.gw.config.http.tokens_file
            tokens = (TokenDB.load(tf) if tf is not None and tf.exists()
                      else TokenDB(path=tf))
            self.server = OpsServer(self.hooks(), ms.listen, tokens)
            urls = await self.server.start()
        if self.fleet is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.fleet.run()))
        return urls

    async def stop(self) -> None:
        """Say "offline" on the fleet topic (a graceful stop sends no will), close."""
        self.serving = False
        for task in self._tasks:
            task.cancel()
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                self.fleet.publish("offline")
        if self.server is not None:
            await self.server.stop()
