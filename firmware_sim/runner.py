"""Asyncio fleet runner: replays a generated :class:`FleetRun` against a gateway.

MQTT clients use the project's sans-I/O codec (:mod:`rapidmq_edge.mqtt.codec`) over asyncio
streams: one TCP connection per client, MQTT 3.1.1, a reader task per connection that
consumes CONNACK/PUBACK/SUBACK. CoAP devices publish with the aiocoap client
(``POST /ps/data/<topic>``, CBOR or text/plain, confirmable). Simulated time maps to wall
time through ``time_scale`` (10 = ten simulated seconds per wall second).

Before sending anything the runner writes the ground truth beside the run
(:func:`write_labels`); ``stats.json`` records what was actually sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rapidmq_edge.mqtt.codec import PacketReader, encode, encode_publish
from rapidmq_edge.mqtt.packets import (
    CONNACK,
    MQTT_311,
    Connect,
    Disconnect,
    SubOptions,
    Subscribe,
)

from .scenario import ClientAction, FleetRun, SimMessage

CONNECT_TIMEOUT = 5.0
COAP_IN_FLIGHT = 64
#: CoAP content formats: text/plain;charset=utf-8, application/cbor
_COAP_CF = {"text": 0, "cbor": 60, "json": 50}


@dataclass
class RunnerConfig:
    """Where and how fast to replay."""

    host: str = "127.0.0.1"
    port: int = 1883
    #: UDP port of the gateway's CoAP listener; None sends no CoAP traffic
    coap_port: int | None = None
    time_scale: float = 1.0
    #: directory for labels.jsonl, clients.jsonl, outages.jsonl, run.json, stats.json
    out_dir: Path | None = None
    #: stop after this many simulated seconds (None = the whole scenario)
    duration: float | None = None
    #: firmware_sim.e2e.DeviceSealer: seal payloads end to end to the cloud (None = plain)
    e2e: Any = None


@dataclass
class RunStats:
    """What the runner did (written to ``stats.json``)."""

    mqtt_published: int = 0
    coap_published: int = 0
    coap_failed: int = 0
    connects: int = 0
    connects_refused: int = 0
    connect_errors: int = 0
    subscribes: int = 0
    not_connected: int = 0
    wall_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- ground truth


def write_labels(run: FleetRun, out_dir: Path, time_scale: float = 1.0) -> None:
    """Write the run's ground truth: one JSON object per line, deterministic for a seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "labels.jsonl", "w") as f:
        for m in run.messages:
            f.write(json.dumps(m.label(), separators=(",", ":")) + "\n")
    clients: dict[str, dict[str, Any]] = {}
    for a in run.actions:
        c = clients.setdefault(a.client, {"client": a.client, "label": a.label,
                                          "first": a.t, "last": a.t, "actions": {}})
        c["last"] = a.t
        if a.label != "benign":
            c["label"] = a.label
        c["actions"][a.action] = c["actions"].get(a.action, 0) + 1
    with open(out_dir / "clients.jsonl", "w") as f:
        for c in sorted(clients.values(), key=lambda c: c["client"]):
            c["first"], c["last"] = round(c["first"], 6), round(c["last"], 6)
            f.write(json.dumps(c, separators=(",", ":"), sort_keys=True) + "\n")
    with open(out_dir / "outages.jsonl", "w") as f:
        for o in run.outages:
            f.write(json.dumps({"device": o.device, "start": round(o.start, 6),
                                "end": round(o.end, 6), "reason": o.reason}) + "\n")
    meta = {"scenario": run.scenario.to_dict(), "time_scale": time_scale,
            "messages": len(run.messages), "actions": len(run.actions),
            "devices": dict(sorted(run.devices.items()))}
    (out_dir / "run.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- MQTT client


class _MqttClient:
    """A minimal MQTT 3.1.1 client over asyncio streams (fire-and-forget publishes)."""

    def __init__(self, client_id: str, stats: RunStats) -> None:
        self.client_id = client_id
        self.stats = stats
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.pending: list[bytes] = []
        self._pid = 0
        self._reader_task: asyncio.Task[None] | None = None
        self._connack: asyncio.Future[int] | None = None

    async def connect(self, host: str, port: int, username: str | None,
                      password: str | None) -> int:
        """Connect; returns the CONNACK return code (-1 on a network error)."""
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.stats.connect_errors += 1
            self.stats.errors.append(f"{self.client_id}: {exc!r}"[:200])
            return -1
        self.writer = writer
        self._connack = loop.create_future()
        self._reader_task = asyncio.create_task(self._read(reader))
        writer.write(encode(Connect(MQTT_311, self.client_id, clean_start=True, keep_alive=600,
                                    username=username,
                                    password=password.encode() if password else None),
                            MQTT_311))
        try:
            rc = await asyncio.wait_for(self._connack, CONNECT_TIMEOUT)
        except (TimeoutError, ConnectionError):
            rc = -1
        self.stats.connects += 1
        if rc != 0:
            self.stats.connects_refused += rc > 0
            await self.close(graceful=False)
            return rc
        self.ready = True
        if self.pending:
            writer.write(b"".join(self.pending))
            self.pending.clear()
        return 0

    async def _read(self, reader: asyncio.StreamReader) -> None:
        pr = PacketReader(version=MQTT_311)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for p in pr.feed(data):
                    if p.type == CONNACK and self._connack and not self._connack.done():
                        self._connack.set_result(p.reason_code)  # type: ignore[union-attr]
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self.ready = False
            if self._connack and not self._connack.done():
                self._connack.set_exception(ConnectionError("closed before CONNACK"))

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Queue a PUBLISH (sent at once when connected, after CONNACK otherwise)."""
        pid = 0
        if qos:
            self._pid = self._pid % 65535 + 1
            pid = self._pid
        pkt = encode_publish(topic.encode(), payload, qos, retain, False, pid, None)
        if self.ready and self.writer is not None:
            self.writer.write(pkt)
        else:
            self.pending.append(pkt)

    def subscribe(self, topic_filter: str) -> None:
        """Send a SUBSCRIBE for one filter (QoS 0)."""
        self._pid = self._pid % 65535 + 1
        pkt = encode(Subscribe(self._pid, [(topic_filter, SubOptions(qos=0))]), MQTT_311)
        if self.ready and self.writer is not None:
            self.writer.write(pkt)
        else:
            self.pending.append(pkt)

    async def close(self, graceful: bool = True) -> None:
        """DISCONNECT (when ``graceful``) and close the socket."""
        self.ready = False
        w, self.writer = self.writer, None
        if w is not None:
            with contextlib.suppress(Exception):
                if graceful:
                    w.write(encode(Disconnect(), MQTT_311))
                    await asyncio.wait_for(w.drain(), 2.0)
                w.close()
                await asyncio.wait_for(w.wait_closed(), 2.0)
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task


# --------------------------------------------------------------------------- the runner


class FleetRunner:
    """Replays ``run`` in (scaled) real time; :meth:`run` returns the statistics."""

    def __init__(self, run: FleetRun, cfg: RunnerConfig) -> None:
        self.fleet = run
        self.cfg = cfg
        self.stats = RunStats()
        self.clients: dict[str, _MqttClient] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._coap: Any = None
        self._coap_sem = asyncio.Semaphore(COAP_IN_FLIGHT)

    def _events(self) -> list[tuple[float, int, ClientAction | SimMessage]]:
        limit = self.cfg.duration if self.cfg.duration is not None else float("inf")
        ev: list[tuple[float, int, ClientAction | SimMessage]] = [
            (a.t, i, a) for i, a in enumerate(self.fleet.actions) if a.t < limit]
        if self.cfg.coap_port is not None:
            n = len(ev)
            ev += [(m.t, n + i, m) for i, m in enumerate(self.fleet.messages)
                   if m.protocol == "coap" and m.t < limit]
        ev.sort(key=lambda e: (e[0], e[1]))
        return ev

    async def run(self) -> RunStats:
        """Send every event at its time; close everything; write ``stats.json``."""
        if self.cfg.out_dir is not None:
            write_labels(self.fleet, self.cfg.out_dir, self.cfg.time_scale)
        if self.cfg.coap_port is not None:
            import aiocoap

            self._coap = await aiocoap.Context.create_client_context()
        loop = asyncio.get_running_loop()
        start = loop.time()
        wall0 = time.monotonic()
        scale = self.cfg.time_scale
        try:
            for t, _, ev in self._events():
                due = start + t / scale
                delay = due - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
                if isinstance(ev, SimMessage):
                    self._spawn(self._coap_publish(ev))
                else:
                    self._dispatch(ev)
            while self._tasks:
                await asyncio.wait(list(self._tasks), timeout=10)
        finally:
            for c in list(self.clients.values()):
                await c.close()
            if self._coap is not None:
                await self._coap.shutdown()
            self.stats.wall_seconds = round(time.monotonic() - wall0, 3)
            if self.cfg.out_dir is not None:
                (self.cfg.out_dir / "stats.json").write_text(
                    json.dumps(asdict(self.stats), indent=1) + "\n")
        return self.stats

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _dispatch(self, a: ClientAction) -> None:
        c = self.clients.get(a.client)
        if a.action == "connect":
            if c is not None and c.writer is not None:
                return  # already connected (merged outages)
            c = self.clients[a.client] = _MqttClient(a.client, self.stats)
            self._spawn(self._connect(c, a))
        elif a.action == "disconnect":
            if c is not None:
                del self.clients[a.client]
                self._spawn(c.close())
        elif c is None:
            self.stats.not_connected += 1
        elif a.action == "publish":
            m = a.message
            if m is not None:
                payload = self.cfg.e2e.seal(m.topic, m.payload) if self.cfg.e2e else m.payload
                c.publish(m.topic, payload, m.qos, m.retain)
            else:
                c.publish(a.topic, b"x" * a.size, 0, False)
            self.stats.mqtt_published += 1
        elif a.action == "subscribe":
            c.subscribe(a.topic)
            self.stats.subscribes += 1

    async def _connect(self, c: _MqttClient, a: ClientAction) -> None:
        rc = await c.connect(self.cfg.host, self.cfg.port, a.username, a.password)
        if rc != 0 and self.clients.get(a.client) is c:
            del self.clients[a.client]
        if not a.ok and rc == 0:
            await c.close()  # a guessed login that the gateway accepted: leave again
            if self.clients.get(a.client) is c:
                del self.clients[a.client]

    async def _coap_publish(self, m: SimMessage) -> None:
        import aiocoap
        from aiocoap.numbers.codes import Code

        payload = self.cfg.e2e.seal(m.topic, m.payload) if self.cfg.e2e else m.payload
        req = aiocoap.Message(code=Code.POST, payload=payload,
                              uri=f"coap://{self.cfg.host}:{self.cfg.coap_port}/ps/data/{m.topic}")
        req.opt.content_format = _COAP_CF[m.content_format]
        async with self._coap_sem:
            try:
                resp = await asyncio.wait_for(self._coap.request(req).response, 30)
                if resp.code.is_successful():
                    self.stats.coap_published += 1
                else:
                    self.stats.coap_failed += 1
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(f"coap {m.topic}: {resp.code}")
            except Exception as exc:
                self.stats.coap_failed += 1
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(f"coap {m.topic}: {exc!r}"[:200])


async def run_fleet(run: FleetRun, cfg: RunnerConfig) -> RunStats:
    """Replay ``run`` against the gateway described by ``cfg``."""
    return await FleetRunner(run, cfg).run()
