"""The gateway put together: every part built from the validated configuration, in the order
the message path needs them, each given what it uses as constructor arguments.

The path (docs/architecture.md)::

    listeners ─► Broker ─► tap: IntelligenceRuntime ─► Forwarder ─► [Protector] ─► ForwardQueue
                   │        (or the Forwarder alone)                                   │
                   └─► local subscribers          Downstream ◄── UplinkClient per upstream

The broker acknowledges a PUBLISH once the commit futures it is given (``durable``) resolve:
the session store's, the forward queue's and, with ``[intelligence]``, the runtime's.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..broker.broker import Broker, BrokerLimits
from ..broker.connection import ClientConnection
from ..broker.message import Message
from ..broker.negotiation import ConnectionSettings
from ..config import Config
from ..ingress.mqtt_server import ConnectionRegistry, serve_mqtt
from ..ops.dashboard_snapshot import DashboardSource
from ..ops.forwarding_status import ForwardingStatus
from ..ops.process_stats import LoopLag, process_values
from ..ops.status import STATUS_FILE, keep_status
from ..ops.sys_topics import flatten, publish_sys, sys_values
from ..ops.tenant_sys import publish_tenant_sys
from ..ops.traffic import ClientActivity, TrafficCounter
from ..pipeline.downstream import Downstream
from ..pipeline.retention import Retention
from ..security.gatekeeper import Gatekeeper
from ..store.disk import DiskSpace
from ..store.session_store import SessionStore
from ..uplink.client import MessageCallback, UplinkClient
from .datadir import lock_data_dir
from .erasure_live import ErasureGate, LiveErasure
from .forwarding import ForwardPath, build_forward_path, build_uplinks
from .operations import OperatorView
from .updates import build_feedback, build_ota_agent

__all__ = ["Gateway", "broker_limits", "connection_settings"]

log = logging.getLogger("rapidmq_edge")


def broker_limits(config: Config) -> BrokerLimits:
    """The broker-wide limits of ``[mqtt]``."""
    m = config.mqtt
    return BrokerLimits(m.max_queued_messages, m.max_queued_bytes, m.max_qos,
                        m.retain_available, m.max_session_expiry)


def connection_settings(config: Config) -> ConnectionSettings:
    """The per-connection limits of ``[mqtt]``."""
    m = config.mqtt
    return ConnectionSettings(
        max_packet_size=m.max_packet_size,
        receive_maximum=m.receive_maximum,
        max_inflight_messages=m.max_inflight_messages,
        topic_alias_maximum=m.topic_alias_maximum,
        retain_available=m.retain_available,
        max_qos=m.max_qos,
        server_keep_alive=m.server_keep_alive,
        max_keep_alive=m.max_keep_alive,
        max_session_expiry=m.max_session_expiry,
        max_connections=m.max_connections,
        publish_rate=m.publish_rate,
        publish_burst=m.publish_burst,
    )


class Gateway:
    """A gateway: ``Gateway(config)`` builds it, ``start()`` serves, ``stop()`` shuts down."""

    def __init__(self, config: Config) -> None:
        self.config = c = config
        gid = c.gateway.id
        data_dir = c.gateway.data_dir
        fw = c.forwarding
        self._lock = lock_data_dir(data_dir)
        self.disk = DiskSpace(data_dir, c.gateway.disk_reserve, c.gateway.disk_ballast)
        self.disk.restore_ballast()
        p = c.persistence
        self.store = SessionStore(data_dir / "broker.db", p.durability, p.commit_delay_ms / 1000,
                                  self.disk)
        # the pipeline side of store-and-forward: queue, protection, forwarder
        self.forward: ForwardPath | None = (build_forward_path(gid, fw, data_dir, self.disk)
                                            if fw.upstreams else None)
        queue = self.forward.queue if self.forward is not None else None
        forwarder = self.forward.forwarder if self.forward is not None else None
        self.intelligence: Any = None  # pipeline.intelligence_runtime.IntelligenceRuntime
        self.ota_models: Any = None  # ota.activate.ActiveModels: OTA slots used at this start
        self.ota_host: Any = None
        if c.intelligence.enabled:
            from ..ota.activate import gate_from_settings, load_active_models
            from ..pipeline.intelligence_runtime import IntelligenceRuntime  # numpy, onnxruntime

            ota = getattr(c, "ota", None)  # the crash-loop guard's [ota] settings, if any
            self.ota_models = load_active_models(
                data_dir, [n for n in ("priority", "threat")
                           if getattr(c.intelligence, n) == "model"],
                getattr(ota, "crashloop_starts", 3), getattr(ota, "crashloop_window", 300.0))
            self.intelligence = IntelligenceRuntime(
                c.intelligence, forwarder, queue, self._publish_local, fw.upstreams, gid,
                data_dir, self.ota_models.scorers)
            # ota.activate.RuntimeModelHost: shadow, promotion and rollback in this process
            self.ota_host = self.ota_models.host(self.intelligence.models,
                                                 c.intelligence.models_dir,
                                                 gate_from_settings(ota))
        #: [ota]: manifests in over the upstream cluster, models to shadow and active
        self.ota_agent = build_ota_agent(c, self.ota_host)
        #: the feedback loop: sampled rows, incident verdicts (None without intelligence)
        self.feedback = build_feedback(c, self.ota_agent)
        if self.feedback is not None and self.intelligence is not None:
            self.intelligence.feedback = self.feedback.tap
        # the broker's taps: the runtime (which drives the forwarder) or the forwarder alone;
        # a PUBLISH is acknowledged once every durable stage behind them has committed it
        taps: list[Callable[[Message], None]] = []
        durable: list[Callable[[], asyncio.Future[Any] | None]] = []
        if self.forward is not None:
            taps.append(self.forward.forwarder)
            durable.append(self.forward.queue.commit_future)
        if self.intelligence is not None:
            taps = [self.intelligence.tap]
            durable.append(self.intelligence.commit_future)
        # counts per topic and publisher for the dashboard: once a message is routed
        self.traffic = TrafficCounter()
        # [[retention]]: bounds every message's expiry before anything stores it
        self.retention = Retention(c.retention, c.auth.tenant_mountpoint) if c.retention else None
        if self.retention is not None:
            taps.insert(0, self.retention)
        self.access = Gatekeeper.from_config(c)
        self.broker = Broker(broker_limits(c), self.store, taps, durable,
                             self.access.read_check, (self.traffic,))
        # the uplink side: one client per upstream draining the queue, downstream rules
        self.uplinks: list[UplinkClient] = []
        self.forward_status: ForwardingStatus | None = None
        if self.forward is not None:
            self.uplinks = build_uplinks(gid, fw, self.forward.queue, self._downstream)
            self.forward_status = ForwardingStatus(
                self.forward.queue, self.forward.forwarder, self.forward.protect, self.uplinks,
                fw.queue, data_dir)
        # ingress
        self.settings = connection_settings(c)
        # the connections' hooks: client activity for the dashboard, then the threat watch
        # (behind the erasure gate: a client id being erased is refused at CONNECT)
        self.erasure_gate = ErasureGate(self.intelligence.watch
                                        if self.intelligence is not None else None)
        self.watch = ClientActivity(self.erasure_gate)
        #: erasure while running (POST /api/v1/erase)
        self.erasure = LiveErasure(self, self.erasure_gate)
        self.registry = ConnectionRegistry(c.mqtt.connect_rate)
        self.servers: list[Any] = []
        self.http: Any = None  # ingress.http.HttpApi when [http] listen is set
        self.coap: Any = None  # ingress.coap_server.CoapServer when [coap] listen is set
        self.bound: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.loop_lag = LoopLag()
        intel = c.intelligence
        self.health: Any = None  # ops.health_watch.HealthWatch (its detector needs numpy)
        if intel.enabled and intel.health:
            from ..ops.health_watch import HealthWatch

            self.health = HealthWatch(self._publish_alert, self.loop_lag,
                                      self.forward.queue if self.forward is not None else None,
                                      self.uplinks, self.disk, intel.health_interval_s)
        self._uplink_tasks: list[asyncio.Task[None]] = []
        #: /metrics, /livez, /readyz and the fleet status (gateway/operations.py)
        self.operator = OperatorView(self)
        if self.ota_agent is not None:
            self.operator.set_ota_components(self.ota_agent.metric_labels)
        self.dashboard = DashboardSource(self.snapshot, self.broker, self.traffic, self.watch,
                                         self._commit_ms, queue)

    # -- wiring the parts call back into -------------------------------------------------

    def _publish_local(self, msg: Message) -> None:
        """Publish a message of the gateway's own (an intelligence alert) to local clients."""
        self.broker.publish(msg)

    def _publish_alert(self, topic: str, payload: bytes) -> None:
        """Publish one of the gateway's own alerts (QoS 1) to local subscribers."""
        self.broker.publish(Message(topic, payload, 1, False, {}, None, "$edge"))

    def _downstream(self, upstream: str) -> tuple[Sequence[tuple[str, int]], MessageCallback]:
        rules = Downstream(self.broker, upstream, self.config.forwarding.downstream,
                           self.config.gateway.id)
        return rules.subscriptions, rules

    def _intelligence_sys(self) -> dict[str, str]:
        return flatten("intelligence", self.intelligence.snapshot(), typed=True)

    def _retention_sys(self) -> dict[str, str]:
        r = self.retention
        assert r is not None
        return flatten("retention", {"limited": r.limited, "dropped": r.drops}, typed=True)

    def _commit_ms(self) -> float | None:
        """The longest group commit (ms) lately: the health watch's sample when it runs (it
        consumes the queue's maximum), else the queue's own."""
        if self.health is not None:
            return self.health.last.get("commit_ms")
        if self.forward is not None:
            return self.forward.queue.commit_latency() * 1000.0
        return None

    def _connection(self, transport: Any, peer: str) -> ClientConnection:
        return ClientConnection(self.broker, self.access, self.settings, transport, peer,
                                watch=self.watch)

    # -- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the message path from the store outwards, then bind the listeners."""
        loop = asyncio.get_running_loop()
        c = self.config
        self.broker.start()
        if self.forward is not None:
            if self.forward.protect is not None:
                self.forward.protect.start()
            for client in self.uplinks:
                self._uplink_tasks.append(loop.create_task(client.run()))
                log.info("forwarding to upstream %s via %s", client.name,
                         ", ".join(u.raw for u in client.urls))
        if self.intelligence is not None:
            self.intelligence.start()
            self.dashboard.listen_for_alerts()
            self.tasks.append(loop.create_task(self.ota_models.run(self.ota_host)))
        if self.ota_agent is not None:
            self.tasks.append(loop.create_task(self.ota_agent.link.run()))
            self.tasks.append(loop.create_task(self.ota_agent.run()))
        if self.feedback is not None:
            self.tasks.append(loop.create_task(self.feedback.run()))
        self.servers, self.bound = await serve_mqtt(c.mqtt.listen, c.mqtt.tls, self._connection,
                                                    self.registry)
        if c.http.listen:
            from ..ingress.http import HttpApi  # aiohttp is only imported when enabled

            self.http = HttpApi(self.broker, self.access, c.http, self.snapshot,
                                ops=self.operator.hooks(),
                                dashboard=self.dashboard.build)
            if self.feedback is not None:
                self.http.verdicts = self.feedback.http_verdict
            self.http.erase = self.erasure.http
            self.bound.extend(await self.http.start())
        if c.coap.listen:
            from ..ingress.coap_server import CoapServer  # aiocoap: only when enabled

            self.coap = CoapServer(self.broker, self.access, c.coap)
            self.bound.extend(await self.coap.start())
        self.tasks.append(loop.create_task(self.loop_lag.run()))
        if self.retention is not None:
            self.tasks.append(loop.create_task(self.retention.run(self.broker)))
        self.tasks.append(loop.create_task(self.disk.run()))
        if self.forward_status is not None:
            self.tasks.append(loop.create_task(self.forward_status.run()))
        if self.health is not None:
            self.tasks.append(loop.create_task(self.health.run()))
        interval = c.mqtt.sys_interval
        if interval > 0:
            extra: list[Callable[[], dict[str, str]]] = []
            if self.forward_status is not None:
                extra.append(self.forward_status.sys_values)
            if self.intelligence is not None:
                extra.append(self._intelligence_sys)
            if self.health is not None:
                extra.append(self.health.sys_values)
            if self.retention is not None:
                extra.append(self._retention_sys)
            self.tasks.append(loop.create_task(publish_sys(self.broker, interval, extra)))
            tenants = self.access.tenants
            if tenants is not None:  # each tenant's own $SYS view under its mountpoint
                self.tasks.append(loop.create_task(publish_tenant_sys(
                    self.broker, tenants.tenant_of, tenants.mountpoint, interval)))
        self.bound.extend(await self.operator.start())
        self.operator.serving = True
        status_path = c.gateway.data_dir / STATUS_FILE
        self.tasks.append(
            loop.create_task(keep_status(status_path, self.snapshot, min(interval or 5.0, 5.0)))
        )

    def snapshot(self) -> dict[str, Any]:
        """Everything ``rapidmq-edge status`` shows."""
        return {
            "gateway": self.config.gateway.id,
            "pid": os.getpid(),
            "listeners": self.bound,
            "broker": sys_values(self.broker),
            "process": {**process_values(), "loop_lag": self.loop_lag.snapshot()},
            "disk": self.disk.snapshot(),
            "health": self.health.snapshot() if self.health is not None else None,
            "forwarding": (self.forward_status.snapshot() if self.forward_status is not None
                           else None),
            "intelligence": (self.intelligence.snapshot() if self.intelligence is not None
                             else None),
            "ota": self.ota_agent.snapshot() if self.ota_agent is not None else None,
            "feedback": self.feedback.status() if self.feedback is not None else None,
        }

    async def stop(self) -> None:
        """Stop accepting, disconnect clients, then stop the path from the listeners inwards
        (in-flight uplink messages stay queued) and write durable state."""
        await self.operator.stop()
        if self.ota_agent is not None:  # says offline, then a clean DISCONNECT
            await self.ota_agent.link.stop()
        for server in self.servers:
            server.close()
        for task in self.tasks:
            task.cancel()
        if self.http is not None:
            await self.http.stop()
        if self.coap is not None:
            await self.coap.close()
        self.registry.shutdown()
        await asyncio.sleep(0.05)  # let DISCONNECTs flush
        if self.intelligence is not None:
            await self.intelligence.stop()
        if self.forward is not None:
            await self._stop_forwarding(self.forward)
        await self.broker.close()
        self._lock.close()

    async def _stop_forwarding(self, forward: ForwardPath) -> None:
        for client in self.uplinks:
            try:
                await client.stop()
            except Exception:  # pragma: no cover - shutdown must go on
                log.exception("stopping uplink %s", client.name)
        for task in self._uplink_tasks:
            task.cancel()
        if self._uplink_tasks:
            await asyncio.wait(self._uplink_tasks, timeout=5)
        if forward.protect is not None:
            await forward.protect.stop()
        await forward.queue.close()
