"""MQTT throughput / latency / memory benchmark: RapidMQ Edge gateway vs. Mosquitto.

Method
------
Both brokers are started side by side on free 127.0.0.1 ports (Mosquitto from a
generated config, the gateway as ``python -m rapidmq_edge run --config CONF``) and are
driven, one after the other, by the same raw-socket MQTT 3.1.1 load generator
(``bench/loadgen.py``; pre-encoded packets, bulk ``sendall``/``recv``, fixed-header
scanning), whose publisher and subscriber run in separate processes.

Scenarios (names are the keys of ``scenarios`` in the JSON output):

* ``qos0_1to1_64B`` / ``qos0_1to1_1KiB``: 1 publisher -> 1 subscriber, QoS 0.
* ``qos1_1to1_64B`` / ``qos1_1to1_1KiB``: QoS 1 publish with ``--window`` messages in
  flight, subscriber at QoS 1 acknowledging every delivery (PUBACKs batched per read).
* ``qos0_fanout10_64B``: 1 publisher -> 10 subscribers on the same topic; the rate is
  deliveries/s summed over the subscribers.
* ``latency_qos0_1000mps`` / ``latency_qos1_1000mps``: publisher paced at
  ``--latency-rate`` msg/s for ``--latency-seconds``, ``time.monotonic_ns()`` in the
  payload, p50/p90/p99/max end-to-end latency in ms (first 5% of samples dropped);
  ``--repeat`` runs alternating between the brokers, the run with the median p99 kept.
  A probe process sleeping 1 ms at a time runs beside each: ``sched_p99_ms`` is how late
  its wake-ups were (the machine's scheduling delay, paid by publisher, broker and
  subscriber at every message): a broker p99 near it is the machine's tail, not the
  broker's.
* ``qos0_1to1_64B_acl10``: as ``qos0_1to1_64B`` with 10 ACL rules configured on both
  brokers (denies that never match, one of them on subscribing, so reading is checked at
  every delivery; Mosquitto: the same denies in an ``acl_file``); ``acl10_rate_ratio`` is
  the rate with them / without, per broker.
* ``rss_idle_clients``: RSS of the broker (incl. child processes) right after start
  and with ``--idle-clients`` connected clients each holding one subscription.
* ``start_rss``: RSS one second after a fresh start (median of 3 starts) per
  configuration: the gateway with its embedded defaults (``rapidmq-edge run``, no file:
  needs port 1883 free) and with a minimal MQTT-only file (a listener and a data
  directory), Mosquitto with ``-p PORT``.
* ``connect_storm``: ``--storm-clients`` clients connect and subscribe as fast as
  ``bench/connect_storm.py`` can (pre-built CONNECT+SUBSCRIBE bytes, non-blocking sockets,
  two processes): the time to the last SUBACK, the broker's CPU time per connect and the
  generator's CPU time (well below the broker's: the generator is not what is measured).

Mosquitto runs with its defaults (``set_tcp_nodelay false``) except for the latency
scenarios, for which it is restarted with ``set_tcp_nodelay true`` (asyncio, hence the
gateway, sets TCP_NODELAY by default; without it Nagle adds multi-ms outliers at
1,000 msg/s).  So Mosquitto gets its better setting in every scenario.

Throughput is counted at the subscriber(s): ``msg_per_s`` = messages RECEIVED divided by
the time from the publisher's first send to the last receipt (all connections and
subscriptions are set up before the clock starts, so this is the steady state of a
broker under saturation; CLOCK_MONOTONIC is shared by the processes).
``steady_msg_per_s`` (received between the moments 10% and 90% of the final count
arrived) is reported as a diagnostic only: when a run's bytes fit in the loopback
socket buffers (small ``--messages``) it over-states the broker's rate because the
subscriber may drain a backlog in one burst.  ``loss_pct`` shows QoS 0 messages a
broker dropped.  The broker's CPU% (100 = one core; psutil or /proc, sampled every
20 ms, broker child processes included) over the same interval is reported next to the
load generator's CPU% so a reader can see which side is the bottleneck; on a 2-core
machine the generator has one core.  Throughput scenarios run ``--repeat`` times and
the median run is kept (``runs`` lists all); the brokers alternate run by run
(Mosquitto, gateway, Mosquitto, ...) so a change of the machine's load hits both alike, and
every run records the 1-minute load average.  ``broker_us_per_msg`` is the broker's CPU
time per message received (per delivery in fan-out); the ratio's ``cpu_efficiency`` is
Mosquitto's divided by the gateway's (>= 0.8 is the target).  ``loss_pct_max`` is the
worst run's QoS 0 loss.  A result whose broker CPU% is below 80%
gets a ``warning`` (not saturated: busy machine or generator-bound).  In QoS 0
throughput runs the subscriber naps ``--sub-nap-ms`` after small reads to batch them.
``ratio`` is gateway/mosquitto (for latency and RSS a ratio > 1 means the gateway is
worse). A latency scenario reports the run with the median p99 and ``pooled_p50`` /
``pooled_p99``: the percentiles of every run's samples together (5 runs: 23,750 samples,
a p99 that moves less between invocations than one run's over 4,750).

Failures never hang the run: every wait is bounded; a broker that does not start,
dies, or does not deliver gets an ``error`` entry for the affected scenario(s).

Usage::

    python3 bench/mqtt_throughput.py --quick            # smoke run: NOT a measurement
    python3 bench/mqtt_throughput.py --out              # full run, also writes
                                                        # bench/results/mqtt_throughput.json
    python3 bench/mqtt_throughput.py --gateway-cmd mosquitto   # debug: 2nd Mosquitto
    python3 bench/mqtt_throughput.py --busy ...   # one core kept busy: the other state
    python3 bench/mqtt_throughput.py --tree before=/tmp/old   # + a gateway from another
                                                # tree (git archive + its built *.so),
                                                # alternating with the others

Linux only (``/proc``, ``fork``).  Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # ``python -m bench.mqtt_throughput``
    from bench import connect_storm, loadgen
except ImportError:  # ``python bench/mqtt_throughput.py`` (sys.path[0] == bench/)
    import connect_storm  # type: ignore[no-redef]
    import loadgen  # type: ignore[no-redef]

try:
    import psutil
except ImportError:  # /proc fallback
    psutil = None

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "mqtt_throughput.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.02
SATURATED_PCT = 80.0  # broker CPU% below which a throughput number gets a warning
SAMPLES = "_latency_us"  # a latency run's samples (µs), pooled by summarise, not printed


# --------------------------------------------------------------------------- process stats


def _proc_tree(pid: int) -> list[int]:
    if psutil is not None:
        try:
            proc = psutil.Process(pid)
            return [pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.Error:
            return [pid]
    return [pid]


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU seconds of ``pids`` (dead ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_bytes(pids: list[int]) -> int:
    """Sum of VmRSS of ``pids``."""
    total = 0
    for pid in pids:
        if psutil is not None:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
            continue
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


# --------------------------------------------------------------------------- brokers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """One broker subprocess (own session, so the whole tree can be stopped)."""

    name: str
    kind: str  # "mosquitto" | "rapidmq"
    workdir: Path
    mosquitto_bin: str
    python: str
    start_timeout: float
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    nodelay: bool = False  # Mosquitto only: set_tcp_nodelay
    acl_rules: int = 0  # ACL rules configured (the *_acl10 scenario): see acl_config
    ever_up: bool = False
    error: str = ""
    pids: list[int] = field(default_factory=list)
    repo: Path = REPO  # the source tree a gateway runs from (PYTHONPATH)

    def _command(self) -> list[str]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kind == "mosquitto":
            conf = self.workdir / "mosquitto.conf"
            acl = ""
            if self.acl_rules:
                acl_file = self.workdir / "acl"
                acl_file.write_text(mosquitto_acl(self.acl_rules))
                # Mosquitto started as root reads it after dropping to its own user
                acl_file.chmod(0o644)
                for d in (self.workdir, self.workdir.parent):
                    d.chmod(d.stat().st_mode | 0o011)
                acl = f"acl_file {acl_file}\n"
            conf.write_text(
                f"listener {self.port} {HOST}\n"
                f"{acl}"
                "allow_anonymous true\n"
                "max_connections -1\n"
                "max_queued_messages 100000\n"
                "persistence false\n"
                f"set_tcp_nodelay {'true' if self.nodelay else 'false'}\n"
                "connection_messages false\n"
                "log_dest stderr\n"
                "log_type error\n"
                "log_type warning\n"
            )
            return [self.mosquitto_bin, "-c", str(conf)]
        conf = self.workdir / "gateway.toml"
        conf.write_text(
            "[gateway]\n"
            'id = "bench"\n'
            f'data_dir = "{self.workdir / "data"}"\n'
            "[mqtt]\n"
            f'listen = ["tcp://{HOST}:{self.port}"]\n'
            "max_connections = 20000\n"
            "max_queued_messages = 100000\n"
            "[auth]\n"
            "allow_anonymous = true\n"
            + gateway_acl(self.acl_rules)
        )
        return [self.python, "-m", "rapidmq_edge", "run", "--config", str(conf)]

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-1200:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> bool:
        """Start and wait (bounded) until an MQTT CONNECT succeeds."""
        self.stop()
        self.starts += 1
        self.port = free_port()
        self.error = ""
        cmd = self._command()
        env = dict(os.environ)
        if self.kind == "rapidmq":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.repo), env.get("PYTHONPATH", "")) if p
            )
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                self.error = f"cannot start {cmd[0]}: {exc}"
                return False
        deadline = time.monotonic() + self.start_timeout
        last_exc = ""
        while time.monotonic() < deadline:
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                self.error = f"exited with code {rc} during startup: {self.log_tail()}"
                return False
            try:
                sock = loadgen.open_client(HOST, self.port, "bench-probe", timeout=2.0)
                loadgen.close_quietly(sock)
                self.pids = _proc_tree(self.proc.pid) if self.proc else []
                self.ever_up = True
                return True
            except OSError as exc:
                last_exc = f"{type(exc).__name__}: {exc}"
                time.sleep(0.1)
        self.error = (
            f"not accepting MQTT connections after {self.start_timeout:.0f}s "
            f"({last_exc}): {self.log_tail()}"
        )
        self.stop()
        return False

    def ensure(self) -> bool:
        """Running, or restarted after a crash (at most twice), or ``error`` is set.

        A broker that never came up is not retried (each attempt costs a start timeout).
        """
        if self.alive():
            return True
        if self.proc is not None and self.ever_up:
            self.error = f"died (code {self.proc.returncode}): {self.log_tail()}"
            self.stop()
        if not self.ever_up or self.starts >= 3:
            return False
        return self.start()

    def stop(self) -> None:
        """SIGTERM the broker's process group, SIGKILL after 5 s."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.proc = None

    def configure(self, nodelay: bool, acl_rules: int = 0) -> None:
        """Restart with another ``set_tcp_nodelay`` (Mosquitto) or ACL if it differs."""
        nodelay = nodelay and self.kind == "mosquitto"
        if self.nodelay == nodelay and self.acl_rules == acl_rules:
            return
        self.nodelay = nodelay
        self.acl_rules = acl_rules
        if self.proc is not None:
            self.starts = 0
            self.start()

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def rss(self) -> int:
        if self.proc is not None:
            self.pids = _proc_tree(self.proc.pid)
        return rss_bytes(self.pids)


def _acl_topics(n: int) -> list[tuple[str, str]]:
    """``n`` rules (topic, action) that never match the benchmark's topics: publish denies
    and one subscribe deny (so the gateway checks reading at every delivery, as Mosquitto
    checks every delivery against its ACL)."""
    return [(f"acl/unrelated/{i}/#", "subscribe" if i == 0 else "publish") for i in range(n)]


def gateway_acl(n: int) -> str:
    """``[[acl]]`` tables of the gateway's config for ``n`` rules (deny, never matching)."""
    return "".join(
        f'[[acl]]\nuser = "*"\ntopic = "{t}"\naction = "{a}"\naccess = "deny"\n'
        for t, a in _acl_topics(n)
    )


def mosquitto_acl(n: int) -> str:
    """Mosquitto ``acl_file`` for anonymous clients: the same ``n`` denies, then the
    benchmark's topics allowed (Mosquitto's ACL is an allow list)."""
    lines = [f"topic deny {t}" for t, _a in _acl_topics(n)]
    return "\n".join([*lines, "topic readwrite bench/#", "topic read $SYS/#", ""])


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out else "unknown"


# --------------------------------------------------------------------------- scenarios


@dataclass
class Options:
    """Scenario sizes (see ``--help``)."""

    messages: int
    qos1_messages: int
    fanout_messages: int
    window: int
    latency_rate: float
    latency_seconds: float
    idle_clients: int
    scenario_timeout: float
    pin: bool
    settle: float  # seconds to let RSS settle / idle timeout unit
    repeat: int
    nap: float
    storm_clients: int = 5000


class ScenarioError(Exception):
    """A scenario could not produce a result."""


_CHILDREN: list[Any] = []


def _spawn(kind: str, kwargs: dict[str, Any], cpus: set[int] | None) -> tuple[Any, Any]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_entry, args=(child, kind, kwargs, cpus), daemon=True)
    proc.start()
    child.close()
    _CHILDREN.append(proc)
    return proc, parent


def _worker_entry(conn: Any, kind: str, kwargs: dict[str, Any], cpus: set[int] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    loadgen.worker(conn, kind, kwargs)


def _reap(procs: list[Any]) -> None:
    for proc in procs:
        if proc.pid is None:
            continue
        proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        with contextlib.suppress(ValueError):
            _CHILDREN.remove(proc)


def _cpu_pct(samples: list[tuple[float, float]], t0: float, t1: float) -> float | None:
    """CPU% between the last sample <= t0 and the first sample >= t1."""
    if not samples or t1 <= t0:
        return None
    before = [s for s in samples if s[0] <= t0] or samples[:1]
    after = [s for s in samples if s[0] >= t1] or samples[-1:]
    a, b = before[-1], after[0]
    if b[0] - a[0] <= 0:
        return None
    return round(100.0 * (b[1] - a[1]) / (b[0] - a[0]), 1)


def run_flow(
    broker: Broker,
    opts: Options,
    *,
    qos: int,
    size: int,
    messages: int,
    subscribers: int = 1,
    latency: bool = False,
) -> dict[str, Any]:
    """One publisher process -> subscriber process; returns the measured numbers."""
    topic = f"bench/{broker.name}/{time.monotonic_ns()}"
    cpus_gen = {1} if opts.pin else None
    timeout = opts.scenario_timeout
    sub_kw: dict[str, Any] = {
        "host": HOST,
        "port": broker.port,
        "topic": topic,
        "qos": qos,
        "conns": subscribers,
        "expected_per_conn": messages,
        "latency": latency,
        "start_timeout": min(15.0, timeout),
        "idle_timeout": 3.0 * opts.settle,
        "max_seconds": timeout,
        "nap": opts.nap if qos == 0 and not latency else 0.0,
    }
    procs: list[Any] = []
    try:
        sub, sub_conn = _spawn("sub", sub_kw, cpus_gen)
        procs.append(sub)
        if not sub_conn.poll(20):
            raise ScenarioError("subscriber(s) not ready after 20 s")
        first = sub_conn.recv()
        if first != "ready":
            raise ScenarioError(f"subscriber: {first.get('error', first)}")
        if latency:
            pub_kw: dict[str, Any] = {
                "host": HOST,
                "port": broker.port,
                "topic": topic,
                "qos": qos,
                "rate": opts.latency_rate,
                "seconds": messages / opts.latency_rate,
                "size": size,
            }
            pub, pub_conn = _spawn("paced", pub_kw, cpus_gen)
        else:
            pub_kw = {
                "host": HOST,
                "port": broker.port,
                "topic": topic,
                "qos": qos,
                "messages": messages,
                "size": size,
                "window": opts.window,
                "max_seconds": timeout,
            }
            pub, pub_conn = _spawn("pub", pub_kw, cpus_gen)
        procs.append(pub)
        samples: list[tuple[float, float]] = []
        gen_samples: list[tuple[float, float]] = []
        gen_pids = [p.pid for p in procs if p.pid]
        sub_res: dict[str, Any] | None = None
        pub_res: dict[str, Any] | None = None
        deadline = time.monotonic() + timeout + 25
        while time.monotonic() < deadline and sub_res is None:
            now = time.monotonic()
            samples.append((now, broker.cpu()))
            gen_samples.append((now, cpu_seconds(gen_pids)))
            if sub_conn.poll(SAMPLE_INTERVAL):
                sub_res = sub_conn.recv()
            if pub_res is None and pub_conn.poll(0):
                pub_res = pub_conn.recv()
        now = time.monotonic()
        samples.append((now, broker.cpu()))
        if sub_res is None:
            raise ScenarioError("subscriber did not report in time")
        if pub_res is None and pub_conn.poll(min(10.0, timeout)):
            pub_res = pub_conn.recv()
        if not sub_res.get("ok"):
            raise ScenarioError(f"subscriber: {sub_res.get('error')}")
        pub_res = pub_res or {"ok": False, "error": "publisher did not report"}
        received = sub_res["received"]
        if not broker.alive() or sub_res["stop_reason"] == "broker closed connections":
            raise ScenarioError(
                f"broker closed the connections / died during the run after {received} of "
                f"{sub_res['expected']} messages ({pub_res.get('error', 'publisher ok')})"
            )
        if received == 0:
            err = pub_res.get("error") if not pub_res.get("ok") else sub_res["stop_reason"]
            raise ScenarioError(f"no messages received ({err})")
        t1 = sub_res["t_last"]
        t0 = pub_res.get("t_start") or sub_res["t_first"]
        t0 = min(t0, sub_res["t_first"])
        cpu_pct = _cpu_pct(samples, t0, t1)
        out: dict[str, Any] = {
            "msg_per_s": round(received / (t1 - t0), 1) if t1 > t0 else None,
            # broker CPU per message received (per delivery in fan-out), microseconds
            "broker_us_per_msg": (
                round(cpu_pct / 100.0 * (t1 - t0) / received * 1e6, 3)
                if cpu_pct is not None and t1 > t0 else None),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "steady_msg_per_s": round(sub_res["rate"], 1),
            "received": received,
            "expected": sub_res["expected"],
            "loss_pct": round(100.0 * (1 - received / sub_res["expected"]), 3),
            "active_s": round(t1 - t0, 3),
            "broker_cpu_pct": cpu_pct,
            "loadgen_cpu_pct": _cpu_pct(gen_samples, t0, t1),
            "stop_reason": sub_res["stop_reason"],
        }
        if subscribers > 1:
            out["per_subscriber_min"] = sub_res["per_conn_min"]
            out["per_subscriber_max"] = sub_res["per_conn_max"]
        if pub_res.get("ok"):
            out["publisher"] = {
                k: pub_res[k] for k in ("sent", "acked", "seconds", "send_rate") if k in pub_res
            }
        else:
            out["publisher_error"] = pub_res.get("error")
        if latency:
            out = {
                "rate_target": opts.latency_rate,
                **sub_res.get("latency_ms", {}),
                SAMPLES: sub_res.get("latency_us", []),
                "received": received,
                "expected": sub_res["expected"],
                "broker_cpu_pct": out["broker_cpu_pct"],
                "stop_reason": sub_res["stop_reason"],
            }
            if not pub_res.get("ok"):
                out["publisher_error"] = pub_res.get("error")
        return out
    finally:
        _reap(procs)


def run_idle_rss(broker: Broker, opts: Options) -> dict[str, Any]:
    """RSS at rest and with ``idle_clients`` connected subscribers."""
    time.sleep(0.5 * opts.settle)
    base = broker.rss()
    t0 = time.monotonic()
    socks = loadgen.open_idle_clients(
        HOST, broker.port, opts.idle_clients, max_seconds=min(120.0, opts.scenario_timeout)
    )
    try:
        connect_s = time.monotonic() - t0
        time.sleep(opts.settle)
        if not broker.alive():
            raise ScenarioError("broker died with idle clients connected")
        loaded = broker.rss()
        time.sleep(0.5 * opts.settle)
        loaded = max(loaded, broker.rss())
    finally:
        loadgen.close_all(socks)
    mb = 1024 * 1024
    return {
        "clients": opts.idle_clients,
        "rss_mb_start": round(base / mb, 2),
        "rss_mb": round(loaded / mb, 2),
        "kb_per_client": round((loaded - base) / 1024 / max(1, opts.idle_clients), 2),
        "connect_s": round(connect_s, 3),
    }


def _fresh_rss(cmd: list[str], port: int, cwd: Path, env: dict[str, str],
               settle: float) -> int:
    """RSS (bytes) of ``cmd`` ``settle`` s after it accepts TCP connections on ``port``."""
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "start.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20.0
        while True:
            if proc.poll() is not None:
                tail = (cwd / "start.log").read_text(errors="replace")[-300:]
                raise ScenarioError(f"{cmd[-1]!r} exited with {proc.returncode}: {tail}")
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise ScenarioError(f"no listener on {port} after 20 s") from None
                time.sleep(0.02)
        time.sleep(settle)
        return rss_bytes([proc.pid])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _sleep_overshoot(conn: Any, seconds: float) -> None:
    """Probe process: how late a 1 ms sleep wakes up, for ``seconds`` (the machine's
    scheduling delay, which every process on the message path pays at each wake-up)."""
    late = []
    end = time.perf_counter() + seconds
    while (t := time.perf_counter()) < end:
        time.sleep(0.001)
        late.append(time.perf_counter() - t - 0.001)
    late.sort()
    conn.send({f"sched_p{p}_ms": round(late[min(len(late) - 1, int(len(late) * p / 100))] * 1e3,
                                       3) for p in (50, 99)})


def run_latency(broker: Broker, opts: Options, *, qos: int) -> dict[str, Any]:
    """``run_flow`` at ``--latency-rate`` with a scheduling probe beside it: a p99 near the
    probe's says the tail is the machine's, not the broker's."""
    n = int(opts.latency_rate * opts.latency_seconds)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    probe = ctx.Process(target=_sleep_overshoot, args=(child, opts.latency_seconds),
                        daemon=True)
    probe.start()
    child.close()
    try:
        out = run_flow(broker, opts, qos=qos, size=64, messages=n, latency=True)
        if parent.poll(opts.latency_seconds + 10):
            out.update(parent.recv())
    finally:
        probe.join(5)
        if probe.is_alive():
            probe.kill()
            probe.join(2)
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return out


def run_start_rss(broker: Broker, opts: Options) -> dict[str, Any]:
    """RSS right after start per configuration, median of 3 fresh starts (MB)."""
    env = dict(os.environ)
    tree = broker.repo  # a gateway from another tree (--tree) starts from it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    out: dict[str, Any] = {}
    for name in (("mqtt_only",) if broker.kind == "mosquitto" else
                 ("embedded_defaults", "mqtt_only")):
        runs = []
        for i in range(3):
            cwd = broker.workdir / f"start-{name}-{i}"
            port = 1883 if name == "embedded_defaults" else free_port()
            if broker.kind == "mosquitto":
                cmd = [broker.mosquitto_bin, "-p", str(port)]
            elif name == "embedded_defaults":
                cmd = [broker.python, "-m", "rapidmq_edge", "run"]
            else:
                cwd.mkdir(parents=True, exist_ok=True)
                (cwd / "g.toml").write_text(
                    f'[gateway]\ndata_dir = "{cwd / "data"}"\n'
                    f'[mqtt]\nlisten = ["tcp://{HOST}:{port}"]\n')
                cmd = [broker.python, "-m", "rapidmq_edge", "run", "--config",
                       str(cwd / "g.toml")]
            try:
                runs.append(_fresh_rss(cmd, port, cwd, env, opts.settle))
            except ScenarioError as exc:
                out[f"{name}_error"] = str(exc)
                break
        if runs:
            out[f"{name}_mb"] = round(sorted(runs)[len(runs) // 2] / 1024 / 1024, 2)
    if "mqtt_only_mb" not in out:
        raise ScenarioError(out.get("mqtt_only_error", "no start"))
    out["rss_mb"] = out["mqtt_only_mb"]  # the key the ratio uses
    return out


def run_connect_storm(broker: Broker, opts: Options) -> dict[str, Any]:
    """``storm_clients`` clients connect and subscribe at once (bench/connect_storm.py)."""
    if broker.proc is None:
        raise ScenarioError("broker not running")
    res = connect_storm.connect_storm(HOST, broker.port, opts.storm_clients,
                                      timeout=opts.scenario_timeout, broker_pid=broker.proc.pid)
    res["loadavg_1m"] = round(os.getloadavg()[0], 2)
    time.sleep(opts.settle)  # the clients' DISCONNECTs are handled before the next run
    return res


@dataclass
class Scenario:
    """One named measurement and the key used for the gateway/mosquitto ratio."""

    name: str
    run: Callable[[Broker, Options], dict[str, Any]]
    ratio_keys: tuple[str, ...]
    repeat: bool = False
    nodelay: bool = False
    acl_rules: int = 0


def scenarios(opts: Options) -> list[Scenario]:
    """All scenarios in execution order (idle RSS first, on a fresh broker)."""
    n, n1, nf = opts.messages, opts.qos1_messages, opts.fanout_messages
    thr = ("msg_per_s", "broker_us_per_msg")
    lat = ("p99", "p50", "pooled_p99")  # runs alternate; the run with the median p99 is kept

    def flow(**kw: Any) -> Callable[[Broker, Options], dict[str, Any]]:
        return lambda b, o: run_flow(b, o, **kw)

    return [
        Scenario("rss_idle_clients", run_idle_rss, ("rss_mb",)),
        Scenario("start_rss", run_start_rss, ("rss_mb",)),
        Scenario("connect_storm", run_connect_storm, ("connect_s", "broker_us_per_connect"),
                 True),
        Scenario("qos0_1to1_64B", flow(qos=0, size=64, messages=n), thr, True),
        Scenario("qos0_1to1_64B_acl10", flow(qos=0, size=64, messages=n), thr, True,
                 acl_rules=10),
        Scenario("qos0_1to1_1KiB", flow(qos=0, size=1024, messages=n), thr, True),
        Scenario("qos1_1to1_64B", flow(qos=1, size=64, messages=n1), thr, True),
        Scenario("qos1_1to1_1KiB", flow(qos=1, size=1024, messages=n1), thr, True),
        Scenario("qos0_fanout10_64B", flow(qos=0, size=64, messages=nf, subscribers=10), thr, True),
        Scenario("latency_qos0_1000mps", lambda b, o: run_latency(b, o, qos=0), lat, True,
                 nodelay=True),
        Scenario("latency_qos1_1000mps", lambda b, o: run_latency(b, o, qos=1), lat, True,
                 nodelay=True),
    ]


def run_once(broker: Broker, sc: Scenario, opts: Options) -> dict[str, Any]:
    """One run of a scenario on ``broker``; any failure becomes ``{"error": ...}``."""
    broker.configure(sc.nodelay, sc.acl_rules)
    if not broker.ensure():
        return {"error": f"broker unavailable: {broker.error}"}
    try:
        return sc.run(broker, opts)
    except (ScenarioError, OSError, ValueError, TimeoutError) as exc:
        err = f"{type(exc).__name__}: {exc}"
        if not broker.alive():
            err += f"; broker died: {broker.log_tail()}"
        return {"error": err}


def summarise(broker: Broker, sc: Scenario, runs: list[dict[str, Any]],
              wall: float) -> dict[str, Any]:
    """The median run (by the scenario's first key), every run's key numbers, warnings."""
    good = [r for r in runs if "error" not in r]
    if good:
        key = sc.ratio_keys[0]
        good.sort(key=lambda r: r.get(key) or 0)
        res = dict(good[(len(good) - 1) // 2])  # median (lower median for even counts)
        if len(runs) > 1:
            res["runs"] = [
                {k: r[k] for k in (key, "p50", "sched_p99_ms", "broker_us_per_msg",
                                   "broker_us_per_connect", "loss_pct", "broker_cpu_pct",
                                   "loadavg_1m", "error")
                 if k in r}
                for r in runs
            ]
        pooled = sorted(v for r in good for v in r.get(SAMPLES, ()))
        if pooled:  # every run's samples together: the steadier tail
            for pct in (50, 99):
                res[f"pooled_p{pct}"] = round(loadgen.percentile(pooled, pct) / 1e3, 3)
            res["pooled_count"] = len(pooled)
        res.pop(SAMPLES, None)
        losses = [r["loss_pct"] for r in good if "loss_pct" in r]
        if losses:
            res["loss_pct_max"] = max(losses)
    else:
        res = runs[-1]
    cpu = res.get("broker_cpu_pct")
    if "msg_per_s" in res and isinstance(cpu, int | float) and cpu < SATURATED_PCT:
        res["warning"] = (
            f"broker used only {cpu}% CPU: not saturated (busy machine or generator-bound);"
            " treat msg_per_s as a lower bound"
        )
    if broker.kind == "mosquitto":
        res["mosquitto_tcp_nodelay"] = broker.nodelay
    res["wall_s"] = round(wall, 2)
    return res


def run_alternating(brokers: dict[str, Broker], sc: Scenario,
                    opts: Options) -> dict[str, dict[str, Any]]:
    """Run ``sc`` on every broker in turn, ``--repeat`` rounds (mosquitto, gateway,
    mosquitto, ...), so a change of the machine's load hits both alike."""
    runs: dict[str, list[dict[str, Any]]] = {role: [] for role in brokers}
    wall = dict.fromkeys(brokers, 0.0)
    for _ in range(opts.repeat if sc.repeat else 1):
        for role, b in brokers.items():
            if runs[role] and "error" in runs[role][-1]:
                continue  # a broker that failed is not run again
            print(f"[bench] {sc.name} on {role} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            runs[role].append(run_once(b, sc, opts))
            wall[role] += time.monotonic() - t0
            if "error" in runs[role][-1]:
                print(f"[bench]   error: {runs[role][-1]['error']}", file=sys.stderr)
    return {role: summarise(brokers[role], sc, runs[role], wall[role]) for role in brokers}


def ratio(gw: dict[str, Any], mq: dict[str, Any], key: str) -> float | None:
    a, b = gw.get(key), mq.get(key)
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(a / b, 3)
    return None


# --------------------------------------------------------------------------- main


def raise_nofile(needed: int) -> dict[str, int]:
    """Raise RLIMIT_NOFILE (inherited by the brokers) to at least ``needed`` if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Mosquitto vs RapidMQ Edge MQTT benchmark (see module docstring)."
    )
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~1 min): checks it works, not a measurement")
    ap.add_argument("--messages", type=int, help="QoS 0 messages per 1->1 run (1000000)")
    ap.add_argument("--qos1-messages", type=int, help="QoS 1 messages per run (200000)")
    ap.add_argument("--fanout-messages", type=int, help="published msgs in fan-out (100000)")
    ap.add_argument("--window", type=int, default=50, help="QoS 1 in-flight window (50)")
    ap.add_argument("--latency-rate", type=float, default=1000.0)
    ap.add_argument("--latency-seconds", type=float, help="(5)")
    ap.add_argument("--idle-clients", type=int, help="(1000)")
    ap.add_argument("--storm-clients", type=int, help="clients of connect_storm (5000)")
    ap.add_argument("--repeat", type=int, help="runs per throughput scenario, median kept (3)")
    ap.add_argument("--scenario-timeout", type=float, default=90.0)
    ap.add_argument(
        "--sub-nap-ms",
        type=float,
        default=0.5,
        help="QoS 0 subscriber sleeps this long after a small read to batch reads (0.5)",
    )
    ap.add_argument(
        "--only", action="append", metavar="NAME", help="run only these scenarios (repeatable)"
    )
    ap.add_argument("--brokers", default="mosquitto,gateway", help="comma list: mosquitto,gateway")
    ap.add_argument(
        "--gateway-cmd",
        choices=("rapidmq", "mosquitto"),
        default="rapidmq",
        help="debug: 'mosquitto' runs a 2nd Mosquitto in place of the gateway",
    )
    ap.add_argument(
        "--tree", action="append", default=[], metavar="ROLE=PATH",
        help="also run a gateway from the source tree PATH as ROLE (repeatable), in turn "
             "with the other brokers: before/after comparisons in one invocation",
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the gateway")
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    ap.add_argument("--gateway-start-timeout", type=float, default=20.0)
    ap.add_argument(
        "--pin", action="store_true", help="pin brokers to CPU 0 and load generator to CPU 1"
    )
    ap.add_argument(
        "--busy", action="store_true",
        help="keep one core busy (a spinning process) for the whole run: the machine's "
             "'busy' state, where idle CPUs wake faster (docs/benchmarks.md, p99 section)",
    )
    ap.add_argument(
        "--out",
        nargs="?",
        const=str(DEFAULT_OUT),
        help=f"also write the JSON here (default {DEFAULT_OUT.relative_to(REPO)})",
    )
    args = ap.parse_args(argv)
    q = args.quick
    # full runs: several seconds per scenario even for Mosquitto (~370k QoS 0 msg/s on a
    # quiet 2-core machine), so both brokers are CPU-bound for most of a run
    args.messages = args.messages or (20_000 if q else 1_000_000)
    args.qos1_messages = args.qos1_messages or (5_000 if q else 200_000)
    args.fanout_messages = args.fanout_messages or (5_000 if q else 100_000)
    args.latency_seconds = args.latency_seconds or (0.5 if q else 5.0)
    args.repeat = args.repeat or (1 if q else 3)
    args.idle_clients = args.idle_clients if args.idle_clients is not None else 1000
    args.storm_clients = args.storm_clients or (1000 if q else 5000)
    return args


def summary_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable table (stderr)."""
    lines = []
    if result["meta"].get("smoke"):
        lines.append("SMOKE RUN (--quick): runs too short for the brokers to be CPU-bound; "
                     "checks that everything works, NOT a measurement")
    lines.append(f"load average at start {result['meta'].get('loadavg_at_start')}, "
                 f"at end {result['meta'].get('loadavg_at_end')} (2 cores; targets are for "
                 "a quiet machine)" + ("; --busy: one core kept busy" if result["meta"].get(
                     "busy_core") else ""))
    lines.append(f"{'scenario':24} {'mosquitto':>40} {'gateway':>40} {'ratio':>8}")
    for name, sc in result["scenarios"].items():
        cells = []
        for who in ("mosquitto", "gateway"):
            r = sc.get(who)
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("ERROR")
            elif "msg_per_s" in r:
                mark = "!" if "warning" in r else ""
                cells.append(
                    f"{r['msg_per_s']:,.0f}/s cpu{r.get('broker_cpu_pct')}%{mark} "
                    f"{r.get('broker_us_per_msg')}us/msg "
                    f"lost{r.get('loss_pct_max', r.get('loss_pct'))}%")
            elif "p99" in r:
                cells.append(f"p50 {r['p50']} p99 {r['p99']} ms (sched {r.get('sched_p99_ms')})")
            elif "generator_cpu_s" in r:  # connect_storm
                cells.append(f"{r['connect_s']} s, {r.get('broker_us_per_connect')} us cpu "
                             f"(gen {r.get('generator_cpu_s')} s)")
            elif "mqtt_only_mb" in r:
                cells.append(f"{r.get('embedded_defaults_mb', '-')} / {r['mqtt_only_mb']} MB")
            elif "rss_mb" in r:
                cells.append(f"{r['rss_mb']} MB")
            else:
                cells.append("?")
        rat = sc.get("ratio")
        if isinstance(rat, dict):
            rat = "/".join(str(v) for v in rat.values())
        lines.append(f"{name:24} {cells[0]:>40} {cells[1]:>40} {rat!s:>8}")
        for who, r in sc.items():  # gateways from other trees (--tree)
            if who not in ("mosquitto", "gateway", "ratio") and isinstance(r, dict) and (
                    "msg_per_s" in r):
                lines.append(f"{'  ' + who:24} {r['msg_per_s']:,.0f}/s "
                             f"cpu{r.get('broker_cpu_pct')}% {r.get('broker_us_per_msg')}us/msg "
                             f"lost{r.get('loss_pct_max', r.get('loss_pct'))}%")
    lines.append(f"(! = broker CPU < {SATURATED_PCT:.0f}%: not saturated, a lower bound; "
                 "lost = the worst run's QoS 0 loss; ratio = gateway/mosquitto rate and "
                 "CPU efficiency, mosquitto us/msg / gateway us/msg)")
    if "acl10_rate_ratio" in result:
        lines.append(f"rate with 10 ACL rules / without: {result['acl10_rate_ratio']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(
        messages=args.messages,
        qos1_messages=args.qos1_messages,
        fanout_messages=args.fanout_messages,
        window=args.window,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds,
        idle_clients=args.idle_clients,
        scenario_timeout=args.scenario_timeout,
        pin=args.pin,
        settle=0.34 if args.quick else 1.0,
        repeat=max(1, args.repeat),
        nap=max(0.0, args.sub_nap_ms / 1000),
        storm_clients=args.storm_clients,
    )
    limits = raise_nofile(max(args.idle_clients, args.storm_clients) + 1024)
    wanted = [b.strip() for b in args.brokers.split(",") if b.strip()]
    all_sc = scenarios(opts)
    if args.only:
        unknown = set(args.only) - {s.name for s in all_sc}
        if unknown:
            print(f"unknown scenario(s): {sorted(unknown)}", file=sys.stderr)
            return 2
        all_sc = [s for s in all_sc if s.name in args.only]
    if opts.pin:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {0})  # inherited by the brokers
    tmp = Path(tempfile.mkdtemp(prefix="rapidmq-bench-"))
    brokers: dict[str, Broker] = {}
    for role in wanted:
        kind = "mosquitto" if role == "mosquitto" else args.gateway_cmd
        brokers[role] = Broker(
            name=role,
            kind=kind,
            workdir=tmp / role,
            mosquitto_bin=args.mosquitto,
            python=args.python,
            start_timeout=10.0 if kind == "mosquitto" else args.gateway_start_timeout,
        )
    trees: dict[str, Broker] = {}  # run first in each round: before, after, Mosquitto
    for spec in args.tree:
        role, _, path = spec.partition("=")
        if not role or not path or role in brokers or role in trees or not (
                Path(path) / "rapidmq_edge").is_dir():
            print(f"--tree {spec!r}: want ROLE=PATH, a new role and a source tree",
                  file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            return 2
        trees[role] = Broker(
            name=role, kind="rapidmq", workdir=tmp / role, mosquitto_bin=args.mosquitto,
            python=args.python, start_timeout=args.gateway_start_timeout,
            repo=Path(path).resolve(),
        )
    brokers = {**trees, **brokers}

    def _on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_signal)
    result: dict[str, Any] = {
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "mosquitto": mosquitto_version(args.mosquitto),
            "gateway_cmd": args.gateway_cmd,
            "trees": {b.name: str(b.repo) for b in brokers.values() if b.kind == "rapidmq"},
            "psutil": psutil is not None,
            "nofile": limits,
            "pinned": opts.pin,
            "busy_core": args.busy,
            "smoke": bool(args.quick),
            "note": (
                "SMOKE RUN (--quick): too short for the brokers to be CPU-bound; not a "
                "measurement" if args.quick else
                "full run: brokers alternate per repeat; loadavg_1m is recorded with every run"
            ),
            "options": {k: v for k, v in vars(opts).items()},
            "method": (
                "raw-socket MQTT 3.1.1 load generator (bench/loadgen.py), publisher and "
                "subscriber(s) in separate processes; msg_per_s = messages received by the "
                "subscriber(s) / (last receipt - first publish); steady_msg_per_s = rate "
                "between 10% and 90% of the final count (diagnostic); median of --repeat "
                "runs; broker_cpu_pct: 100 = one core; ratio = gateway/mosquitto"
            ),
        },
        "scenarios": {},
    }
    rc = 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        for b in brokers.values():
            if not b.start():
                print(f"[bench] {b.name} failed to start: {b.error}", file=sys.stderr)
        for sc in all_sc:
            entry: dict[str, Any] = dict(run_alternating(brokers, sc, opts))
            if "gateway" in entry and "mosquitto" in entry:
                rats = {k: ratio(entry["gateway"], entry["mosquitto"], k) for k in sc.ratio_keys}
                if "broker_us_per_msg" in rats:  # as efficiency: > 1 = the gateway is cheaper
                    r = rats.pop("broker_us_per_msg")
                    rats["cpu_efficiency"] = round(1 / r, 3) if r else None
                entry["ratio"] = rats[sc.ratio_keys[0]] if len(rats) == 1 else rats
            result["scenarios"][sc.name] = entry
        plain = result["scenarios"].get("qos0_1to1_64B", {})
        acl = result["scenarios"].get("qos0_1to1_64B_acl10", {})
        if plain and acl:  # the rate with 10 ACL rules / without, per broker
            result["acl10_rate_ratio"] = {
                role: ratio(acl.get(role, {}), plain.get(role, {}), "msg_per_s")
                for role in brokers}
    except KeyboardInterrupt:
        result["meta"]["interrupted"] = True
        rc = 130
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait(5)
        for proc in list(_CHILDREN):
            _reap([proc])
        for b in brokers.values():
            b.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["meta"]["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["meta"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2)
    print(text)
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"[bench] wrote {out}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
