"""The end-to-end chaos run (issue 16, part 4), shared by the CI test and bench/cloud_ingest.py.

Devices (paho, QoS 1) -> a real gateway (encrypt + sign) -> Mosquitto 2 (persistence on) ->
``cloud ingest`` consumers (partitions, or one ``$share`` group with ``share``) ->
PostgreSQL. During the run the gateway and a consumer are killed with SIGKILL and restarted,
and the broker restarted (SIGTERM, or SIGKILL with ``broker_kill``), in turn. The result says
which device-acknowledged messages reached PostgreSQL, how often, and what was reported.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .cloud_helpers import Consumer, pg_rows
from .conftest import LOOPBACK, MosquittoBroker, _start_mosquitto, wait_for_port
from .crypto_e2e_helpers import GW, gateway_config, make_keys
from .gateway_proc import GatewayProcess

#: broker settings: persistent sessions saved on every change (a kill -9 keeps what was saved)
BROKER_CONF = ("persistence true\npersistence_location {dir}/\nautosave_interval 1\n"
               "autosave_on_changes true\nmax_queued_messages 1000000\n"
               "max_inflight_messages 100\n")
BAD_KINDS = {"tampered", "unverifiable", "missing-message", "missing-batch", "wrong-key",
             "chain-broken", "replay"}


@dataclass
class ChaosResult:
    """What the devices got acknowledged and what PostgreSQL holds."""

    sent: int
    acked: set[str]
    rows: Counter[str]  # payload -> rows
    unencrypted: int
    reports: list[tuple[str, str]]
    kills: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> set[str]:
        return {p for p in self.acked if p not in self.rows}

    @property
    def duplicated(self) -> set[str]:
        return {p for p, n in self.rows.items() if n > 1}

    @property
    def bad_reports(self) -> list[tuple[str, str]]:
        return [r for r in self.reports if r[0] in BAD_KINDS]

    def summary(self) -> dict[str, Any]:
        return {"sent": self.sent, "device_acked": len(self.acked), "rows": len(self.rows),
                "lost": len(self.lost), "duplicated": len(self.duplicated),
                "unencrypted": self.unencrypted, "bad_reports": len(self.bad_reports),
                "kills": self.kills, "seconds": round(self.seconds, 1)}


class Devices(threading.Thread):
    """Publishes ``n`` unique payloads at ``rate``/s in bursts; reconnects when the gateway is
    down; records which payloads the gateway acknowledged (PUBACK)."""

    def __init__(self, port: int, n: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.n, self.rate = port, n, rate
        self.acked: set[str] = set()
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        burst = 20
        while i < self.n and not self.stop.is_set():
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{i}",
                            protocol=mqtt.MQTTv311)
            done: set[int] = set()  # mids acknowledged (no lock around paho's own calls)
            c.on_publish = lambda _c, _u, mid, *_a, done=done: done.add(mid)
            # no reconnect inside paho: it would re-send unacknowledged messages (QoS 1 is
            # at least once), which the gateway rightly takes as new ones; a new client
            # goes on with the next payloads instead
            c.reconnect_delay_set(3600, 3600)
            try:
                c.connect(LOOPBACK, self.port, keepalive=10)
            except OSError:
                time.sleep(0.1)
                continue
            c.loop_start()
            try:
                started = time.monotonic()
                while i < self.n and not self.stop.is_set():
                    sent: dict[int, str] = {}
                    for _ in range(min(burst, self.n - i)):
                        payload = f"m{i}"
                        sent[c.publish(f"sensors/d{i % 7}", payload.encode(), qos=1).mid] = \
                            payload
                        i += 1
                        self.sent = i
                    deadline = time.monotonic() + 3
                    while not sent.keys() <= done and time.monotonic() < deadline:
                        time.sleep(0.005)
                    ok = sent.keys() <= done
                    self.acked.update(p for mid, p in sent.items() if mid in done)
                    done.clear()
                    if not ok or not c.is_connected():
                        break  # the gateway went away: a new connection (unacked = not ours)
                    ahead = started + i / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            finally:
                c.disconnect()
                c.loop_stop()


def _restart_broker(broker: MosquittoBroker, hard: bool) -> None:
    """SIGKILL (``hard``) or SIGTERM mosquitto; start it again on the same port and
    persistence file. SIGTERM saves the persistence file; SIGKILL keeps the last autosave."""
    if hard:
        broker.proc.kill()
    else:
        broker.proc.terminate()
    broker.proc.wait(10)
    log = open(broker.log_path, "ab")  # noqa: SIM115 - owned by the broker object
    broker.proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", str(broker.conf_path)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    if broker.log_file is not None:
        broker.log_file.close()
    broker.log_file = log
    assert wait_for_port(LOOPBACK, broker.port, 10), broker.log()


def kill_rounds(kinds: tuple[str, ...], rounds: int, span: float, rng: random.Random,
                t0: float, kill: Callable[[str], str]) -> list[str]:
    """``rounds`` rounds over ``span`` seconds, each killing every one of ``kinds`` in turn
    after a random pause: ``kill(what)`` does it and names what it killed; returns the
    kills as ``name@seconds#round``."""
    kills: list[str] = []
    for r in range(rounds):
        for what in kinds:
            time.sleep(span / (len(kinds) * rounds + 1) * rng.uniform(0.6, 1.2))
            kills.append(f"{kill(what)}@{time.monotonic() - t0:.1f}s#{r}")
    return kills


def restart_consumer(c: Consumer, rng: random.Random) -> None:
    """SIGKILL a consumer, then start it again after up to half a second."""
    c.kill9()
    time.sleep(rng.uniform(0.0, 0.5))
    c.start(wait=False)


def run_chaos(tmp: Path, dsn: str, *, messages: int = 1500, rate: float = 300.0,
              consumers: int = 2, rounds: int = 1, seed: int = 16,
              settle: float = 30.0, broker_kill: bool = False, share: bool = False,
              kinds: tuple[str, ...] = ("gateway", "consumer", "broker")) -> ChaosResult:
    """One run; ``rounds`` x (gateway, a consumer: SIGKILL; the broker: SIGKILL if
    ``broker_kill``, else SIGTERM — Mosquitto is one node with periodic persistence, so a
    SIGKILL loses what it acknowledged since its last save; see docs/cloud.md)."""
    rng = random.Random(seed)
    state = tmp / "mosq"
    state.mkdir()
    broker = _start_mosquitto(tmp, BROKER_CONF.format(dir=state))
    keys = make_keys(tmp)
    gw_dir = tmp / "gw"
    gw_dir.mkdir()
    gw = GatewayProcess(gw_dir, gateway_config(broker.port, keys, batch_size=32,
                                               batch_max_age=0.3))
    from .cloud_helpers import CloudKeys

    ck = CloudKeys(keys.cloud, keys.trust, None, None)  # type: ignore[arg-type]
    # partitions: Mosquitto 2.0 restores plain subscriptions from its persistence file but
    # not $share ones (a restart drops what is published before the members resubscribe)
    cons = [Consumer(tmp, broker.port, ck, dsn, f"chaos{i}", "--batch-timeout", "120",
                     *(("--group", "g") if share else ("--partition", f"{i}/{consumers}")))
            for i in range(consumers)]
    t0 = time.monotonic()
    devices: Devices | None = None
    try:
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
                restart_consumer(cons[rng.randrange(len(cons))], rng)
            else:
                _restart_broker(broker, broker_kill)
            return what

        kills = kill_rounds(kinds, rounds, span, rng, t0, kill)
        devices.join(span * 3 + 30)
        acked = set(devices.acked)
        deadline = time.monotonic() + settle
        got: Counter[str] = Counter()
        while time.monotonic() < deadline:
            got = Counter(bytes(r[0]).decode() for r in asyncio.run(
                pg_rows(dsn, "SELECT payload FROM messages WHERE gateway = $1", GW)))
            if acked <= set(got):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # consumers past --grace: late copies or reports would show now
        rows = asyncio.run(pg_rows(dsn, "SELECT payload, encrypted FROM messages"))
        reports = [(r[0], r[1]) for r in asyncio.run(
            pg_rows(dsn, "SELECT kind, detail FROM cloud_reports"))]
        return ChaosResult(devices.sent, acked, Counter(bytes(r[0]).decode() for r in rows),
                           sum(1 for r in rows if not r[1]), reports, kills,
                           time.monotonic() - t0)
    finally:
        if devices is not None:
            devices.stop.set()
            devices.join(10)
        for c in cons:
            c.stop()
        gw.stop()
        broker.stop()
        if os.environ.get("RMQ_CHAOS_KEEP"):
            print(f"chaos dir: {tmp}")
