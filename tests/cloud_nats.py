"""A 3-node NATS JetStream cluster with MQTT listeners, and the end-to-end chaos run on it
(issue 16, part 4), shared by tests/test_cloud_nats_chaos.py and bench/cloud_chaos.py.

Devices (paho, QoS 1) -> a real gateway (encrypt + sign, MQTT 3.1.1 upstream: the message id
travels in the id frame) listing all three nodes -> NATS (MQTT state in R3 streams) -> 2
``cloud ingest`` consumers (``--protocol 4 --partition I/2``: NATS 2.9 has no ``$share``), each
on its own node -> PostgreSQL. During the run the gateway, the consumer that owns the gateway's
partition and the NATS node the gateway is connected to are killed with SIGKILL and
restarted, in turn. Every wait is bounded; every process is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import socket
import sqlite3
import subprocess
import time
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from rapidmq_edge.mqtt.id_frame import decode_id_frame, is_id_frame

from .cloud_chaos import ChaosResult, Devices, kill_rounds, restart_consumer
from .cloud_helpers import CloudKeys, Consumer, pg_rows
from .conftest import LOOPBACK, wait_for_port
from .crypto_e2e_helpers import GW, gateway_config, make_keys
from .gateway_proc import GatewayProcess

NATS_BIN = "/usr/sbin/nats-server"
#: the MQTT settings of the run (docs/cloud.md): messages and sessions in R3 streams; R1 session
#: consumers (2.9.10 with R3 ones lost messages published while a subscriber reconnected: 32-142
#: of 2,000 in 4 reconnects, 0 with R1); ``ack_wait`` short, since 2.9 re-sends what a dead
#: connection left unacknowledged only after it (default 30 s). No ``sync_interval`` in 2.9.
MQTT_DURABILITY = 'stream_replicas: 3, consumer_replicas: 1, ack_wait: "2s"'


def nats_available() -> bool:
    """Whether the nats-server binary is installed."""
    return shutil.which(NATS_BIN) is not None


class NatsCluster:
    """Three nats-server processes in one cluster, JetStream and MQTT on each (127.0.0.1)."""

    def __init__(self, tmp: Path, n: int = 3) -> None:
        self.tmp, self.n = tmp, n
        holders = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(4 * n)]
        for h in holders:  # all held at once while picking: none handed out twice
            h.bind((LOOPBACK, 0))
        ports = [int(h.getsockname()[1]) for h in holders]
        for h in holders:
            h.close()
        self.client_ports, self.route_ports = ports[:n], ports[n:2 * n]
        self.mqtt_ports, self.http_ports = ports[2 * n:3 * n], ports[3 * n:]
        routes = ", ".join(f"nats-route://{LOOPBACK}:{p}" for p in self.route_ports)
        self.confs: list[Path] = []
        for i in range(n):
            conf = tmp / f"nats{i}.conf"
            conf.write_text(
                f"server_name: n{i}\nlisten: {LOOPBACK}:{self.client_ports[i]}\n"
                f"http: {LOOPBACK}:{self.http_ports[i]}\n"
                f"jetstream {{ store_dir: '{tmp / f'js{i}'}' }}\n"
                f"cluster {{ name: up, listen: {LOOPBACK}:{self.route_ports[i]}, "
                f"routes: [{routes}] }}\n"
                f"mqtt {{ listen: {LOOPBACK}:{self.mqtt_ports[i]}, {MQTT_DURABILITY} }}\n")
            self.confs.append(conf)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * n

    def url(self, i: int) -> str:
        return f"mqtt://{LOOPBACK}:{self.mqtt_ports[i]}"

    def nats_urls(self) -> str:
        """``--servers`` of the JetStream source: every node's client URL."""
        return ",".join(f"nats://{LOOPBACK}:{p}" for p in self.client_ports)

    def start_node(self, i: int) -> None:
        with open(self.tmp / f"nats{i}.log", "ab") as log:
            self.procs[i] = subprocess.Popen([NATS_BIN, "-c", str(self.confs[i])], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def start(self, timeout: float = 40.0) -> NatsCluster:
        """All nodes; returns once every MQTT listener grants a QoS 1 subscription (JetStream
        has a meta leader and the MQTT streams exist)."""
        for i in range(self.n):
            self.start_node(i)
        deadline = time.monotonic() + timeout
        for i in range(self.n):
            self.wait_mqtt(i, deadline)
        return self

    def wait_mqtt(self, i: int, deadline: float) -> None:
        """Until node ``i`` grants a QoS 1 subscription (bounded by ``deadline``)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nats node {i} MQTT not ready\n{self.log(i)}")
            proc = self.procs[i]
            assert proc is not None and proc.poll() is None, self.log(i)
            if wait_for_port(LOOPBACK, self.mqtt_ports[i], min(left, 5)) and \
                    _probe(self.mqtt_ports[i], min(left, 5)):
                return
            time.sleep(0.2)

    def kill9(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.kill()
        proc.wait(10)

    def mqtt_clients(self, i: int) -> list[str]:
        """MQTT client ids connected to node ``i`` (its monitoring endpoint)."""
        url = f"http://{LOOPBACK}:{self.http_ports[i]}/connz?limit=1000"
        with urllib.request.urlopen(url, timeout=3) as r:
            data = json.load(r)
        return [c.get("mqtt_client", "") for c in data.get("connections") or []]

    def log(self, i: int) -> str:
        path = self.tmp / f"nats{i}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _probe(port: int, timeout: float) -> bool:
    """A QoS 1 subscription granted on ``port`` within ``timeout`` s."""
    granted: list[int] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv311)
    c.on_connect = lambda cl, *_a: cl.subscribe("probe/#", 1)
    c.on_subscribe = lambda _c, _u, _m, codes, *_a: granted.extend(
        int(getattr(x, "value", x)) for x in codes)
    try:
        c.connect(LOOPBACK, port, keepalive=10)
    except OSError:
        return False
    c.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not granted and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(granted) and granted[0] < 0x80
    finally:
        c.disconnect()
        c.loop_stop()


def _queued(gw: GatewayProcess) -> int:
    """Messages still in the gateway's forward queue (-1: not readable now)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{gw.data_dir / 'forward.db'}?mode=ro",
                                                uri=True, timeout=2)) as db:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return -1


def _wait_connected(cluster: NatsCluster, client_id: str, timeout: float) -> int | None:
    """The node ``client_id`` is connected to (None if not seen within ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(cluster.n):
            proc = cluster.procs[i]
            if proc is None or proc.poll() is not None:
                continue
            try:
                if client_id in cluster.mqtt_clients(i):
                    return i
            except OSError:
                pass
        time.sleep(0.1)
    return None


@dataclass
class NatsChaosResult(ChaosResult):
    """:class:`ChaosResult` plus what an independent subscriber saw (which hop lost a message)."""

    observed: set[str] = field(default_factory=set)  # message ids the observer received
    row_ids: set[str] = field(default_factory=set)  # message ids in PostgreSQL
    missing_reported: set[str] = field(default_factory=set)  # ids reported missing-message
    by_consumer: dict[str, int] = field(default_factory=dict)  # rows each consumer wrote

    @property
    def silent(self) -> int:
        """Device-acknowledged messages neither in PostgreSQL nor reported missing (a
        ``missing-message`` report of a message that came later, past the timeout, and was
        written does not count)."""
        return max(0, len(self.lost) - len(self.missing_reported - self.row_ids))

    @property
    def unexpected_reports(self) -> list[tuple[str, str]]:
        """Bad reports other than ``missing-message`` (what a broker loss is reported as)."""
        return [r for r in self.bad_reports if r[0] != "missing-message"]

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["missing_reported"] = len(self.missing_reported - self.row_ids)
        out["missing_reported_then_written"] = len(self.missing_reported & self.row_ids)
        if self.observed:
            out["cluster_delivered_not_in_pg"] = len(self.observed - self.row_ids)
        out["rows_by_consumer"] = dict(sorted(self.by_consumer.items()))
        return out


class Observer:
    """A plain 3.1.1 subscriber (QoS 1) on one node: which message ids the cluster delivered
    (tells a broker loss from a consumer loss when a run fails)."""

    def __init__(self, port: int) -> None:
        self.ids: set[str] = set()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="observer",
                             protocol=mqtt.MQTTv311, clean_session=False)
        self.c.on_connect = lambda cl, *_a: cl.subscribe("edge/#", 1)
        self.c.on_message = self._on_message
        self.c.connect(LOOPBACK, port, keepalive=10)
        self.c.loop_start()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if is_id_frame(payload):
            with contextlib.suppress(ValueError):
                self.ids.add(decode_id_frame(payload)[0])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def run_nats_chaos(tmp: Path, dsn: str, *, messages: int = 900, rate: float = 200.0,
                   rounds: int = 1, seed: int = 16, settle: float = 30.0,
                   observe: bool = False,
                   kinds: tuple[str, ...] = ("node", "gateway", "consumer"),
                   batch_timeout: float = 10.0, source: str = "mqtt",
                   ack_wait: float = 3.0) -> NatsChaosResult:
    """One run; ``rounds`` x (gateway, the owning consumer, the gateway's node: SIGKILL and
    restart). ``kills`` in the result names each, with the node that was killed.

    ``source``: "mqtt" (each consumer a 3.1.1 session, ``--partition I/2``) or "jetstream"
    (both pull from one durable on ``$MQTT_msgs``; ``--partition I/2`` names the judge of
    the gateway's chain only; ``ack_wait``: redelivery of what the killed one held)."""
    rng = random.Random(seed)
    cluster = NatsCluster(tmp)
    keys = make_keys(tmp)
    gw_dir = tmp / "gw"
    gw_dir.mkdir()
    cfg = gateway_config(cluster.mqtt_ports[0], keys, batch_size=32, batch_max_age=0.3)
    up = cfg["upstream"][0]
    up.update(protocol=4, urls=[cluster.url(i) for i in range(cluster.n)], client_id="gw-up")
    gw = GatewayProcess(gw_dir, cfg)
    ck = CloudKeys(keys.cloud, keys.trust, None, None)  # type: ignore[arg-type]
    owner = zlib.crc32(GW.encode()) % 2  # the partition that holds this gateway
    # consumer i on node i + 1: node 0, the gateway's first choice, is the one killed
    cons = [Consumer(tmp, cluster.mqtt_ports[i + 1], ck, dsn, f"ingest{i}", "--protocol", "4",
                     "--batch-timeout", f"{batch_timeout:g}", "--partition", f"{i}/2")
            for i in range(2)]
    if source == "jetstream":
        for c in cons:
            at = c.args.index("--upstream")
            del c.args[at:at + 2]  # the nodes' client URLs instead
            c.args += ["--source", "jetstream", "--servers", cluster.nats_urls(),
                       "--durable", "ingest", "--ack-wait", f"{ack_wait:g}"]
    t0 = time.monotonic()
    devices: Devices | None = None
    observer: Observer | None = None
    try:
        cluster.start()
        if observe:
            observer = Observer(cluster.mqtt_ports[2])
        for c in cons:
            c.start()
        gw.start()
        devices = Devices(gw.port, messages, rate)
        devices.start()
        span = messages / rate

        def kill(what: str) -> str:
            if what == "gateway":
                gw.restart(hard=True)
            elif what == "consumer":
                restart_consumer(cons[owner], rng)
            else:
                node = _wait_connected(cluster, "gw-up", 10)
                assert node is not None, "the gateway is on no node"
                cluster.kill9(node)
                time.sleep(rng.uniform(0.5, 1.5))
                cluster.start_node(node)
                return f"node{node}"
            return what

        kills = kill_rounds(kinds, rounds, span, rng, t0, kill)
        devices.join(span * 3 + 30)
        acked = set(devices.acked)
        # until every acknowledged message is a row, or each one missing (listed in a signed
        # batch, no row) is reported missing: reported after --batch-timeout + --grace
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            got = {bytes(r[0]).decode() for r in asyncio.run(
                pg_rows(dsn, "SELECT payload FROM messages WHERE gateway = $1", GW))}
            missing = asyncio.run(pg_rows(
                dsn, "SELECT count(DISTINCT r.message_id) FROM cloud_reports r WHERE "
                "r.kind = 'missing-message' AND NOT EXISTS "
                "(SELECT 1 FROM messages m WHERE m.id = r.message_id)"))[0][0]
            if acked <= got or (len(acked - got) <= missing and _queued(gw) == 0):
                break  # (a batch header can come before its messages: drained first)
            time.sleep(0.5)
        time.sleep(1.5)  # consumers past --grace: late copies or reports would show now
        rows = asyncio.run(pg_rows(dsn, "SELECT payload, encrypted, id, consumer FROM messages"))
        raw = asyncio.run(pg_rows(dsn, "SELECT kind, detail, message_id FROM cloud_reports"))
        return NatsChaosResult(
            devices.sent, acked, Counter(bytes(r[0]).decode() for r in rows),
            sum(1 for r in rows if not r[1]), [(r[0], r[1]) for r in raw], kills,
            time.monotonic() - t0, set(observer.ids) if observer is not None else set(),
            {r[2] for r in rows}, {r[2] for r in raw if r[0] == "missing-message"},
            dict(Counter(r[3] for r in rows)))
    finally:
        if observer is not None:
            observer.close()
        if devices is not None:
            devices.stop.set()
            devices.join(10)
        for c in cons:
            c.stop()
        gw.stop()
        cluster.stop()
