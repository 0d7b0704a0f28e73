"""Upstream client benchmark: QoS 1 publish throughput into one local Mosquitto.

Clients (each in its own subprocess, one after the other, against the same broker):

* ``uplink_v4`` / ``uplink_v5`` / ``uplink_v5_uvloop``: :class:`rapidmq_edge.uplink.UplinkClient`
  (window 100) fed by an in-memory source; v5 adds the ``rmq-id`` user property (~20 B).
* ``paho_v4`` / ``paho_v5``: paho-mqtt 2.x, ``max_inflight_messages_set(100)``, network
  thread via ``loop_start()``, publishes queued from the main thread.
* ``gmqtt_v4`` / ``gmqtt_v5``: gmqtt (if installed), kept at 100 in flight by waking the
  publisher when its in-flight store drops below 100 (gmqtt has no window of its own;
  99 in v5, where its id pool is Receive Maximum - 1).

Each run connects first, then publishes ``--messages`` QoS 1 messages of ``--size`` bytes
to ``bench/uplink`` (no subscriber) and stops the clock at the last PUBACK.  ``msg_per_s``
is the median of ``--repeat`` runs; ``client_cpu_pct`` is the client process's CPU time
over the same interval (100 = one core) and ``broker_cpu_pct`` Mosquitto's (measured over
the whole child run, so slightly high), so a reader can tell client-bound from
broker-bound.  Mosquitto runs with ``max_inflight_messages 100`` (so its v5 Receive
Maximum does not cap the window at its default of 20) and ``set_tcp_nodelay true``.
Output: JSON on stdout (and ``--out FILE``).

Usage::

    .venv/bin/python bench/uplink_clients.py                # ~30 s
    .venv/bin/python bench/uplink_clients.py --messages 5000 --repeat 1   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"
TOPIC = "bench/uplink"
WINDOW = 100
CLIENTS = ["uplink_v4", "uplink_v5", "uplink_v5_uvloop", "paho_v4", "paho_v5",
           "gmqtt_v4", "gmqtt_v5"]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------- clients


def run_uplink(port: int, n: int, size: int, version: int, use_uvloop: bool) -> dict[str, Any]:
    from rapidmq_edge.uplink import Outgoing, UplinkClient

    payload = b"x" * size

    class Source:
        def __init__(self) -> None:
            self.next = 0
            self.limit = 0
            self.acked = 0
            self.event = asyncio.Event()
            self.done = asyncio.Event()

        def fetch(self, upstream: str, limit: int) -> list[Outgoing]:
            end = min(self.limit, self.next + limit)
            out = [Outgoing(i, TOPIC, payload, 1) for i in range(self.next, end)]
            self.next = end
            return out

        def ack(self, upstream: str, ids: list[int]) -> None:
            self.acked += len(ids)
            if self.acked >= n:
                self.done.set()

        def requeue(self, upstream: str, ids: list[int]) -> None:
            raise RuntimeError("unexpected requeue in benchmark")

        async def wait_for_data(self, upstream: str) -> None:
            while self.next >= self.limit:
                self.event.clear()
                await self.event.wait()

    async def main() -> dict[str, Any]:
        src = Source()
        client = UplinkClient("bench", [f"mqtt://{HOST}:{port}"], f"bench-up-{os.getpid()}",
                              src, version=version, window=WINDOW)
        task = asyncio.create_task(client.run())
        deadline = time.monotonic() + 10
        while not client.connected:
            if time.monotonic() > deadline:
                raise RuntimeError("uplink did not connect")
            await asyncio.sleep(0.005)
        c0, t0 = _cpu(), time.perf_counter()
        src.limit = n
        src.event.set()
        await asyncio.wait_for(src.done.wait(), 60)
        t1, c1 = time.perf_counter(), _cpu()
        await client.stop()
        await task
        return {"seconds": t1 - t0, "cpu_s": c1 - c0, "max_inflight": client.max_inflight}

    if use_uvloop:
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def run_paho(port: int, n: int, size: int, version: int) -> dict[str, Any]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-paho-{os.getpid()}",
                         protocol=proto)
    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    connected = threading.Event()
    done = threading.Event()
    acked = 0

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= n:
            done.set()

    client.on_connect = lambda *a: connected.set()
    client.on_publish = on_publish
    client.connect(HOST, port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("paho did not connect")
    payload = b"x" * size
    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(n):
        client.publish(TOPIC, payload, qos=1)
    if not done.wait(60):
        raise RuntimeError(f"paho: only {acked} of {n} acked")
    t1, c1 = time.perf_counter(), _cpu()
    client.disconnect()
    client.loop_stop()
    return {"seconds": t1 - t0, "cpu_s": c1 - c0}


def run_gmqtt(port: int, n: int, size: int, version: int) -> dict[str, Any]:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50, MQTTv311
    from gmqtt.storage import PersistentStorage

    class WindowStorage(PersistentStorage):
        """Wakes the publisher whenever an in-flight message is acknowledged."""

        def __init__(self) -> None:
            super().__init__()
            self.room: asyncio.Event = asyncio.Event()

        def remove_message_by_mid(self, mid: int) -> None:
            super().remove_message_by_mid(mid)
            self.room.set()

    async def main() -> dict[str, Any]:
        client = gmqtt.Client(f"bench-gmqtt-{os.getpid()}")
        storage = WindowStorage()
        client._persistent_storage = storage
        await client.connect(HOST, port, version=MQTTv50 if version == 5 else MQTTv311)
        payload = b"x" * size
        # gmqtt's id pool holds Receive Maximum - 1 ids in v5 (it raises OverflowError at 100).
        window = WINDOW - 1 if version == 5 else WINDOW
        c0, t0 = _cpu(), time.perf_counter()
        sent = 0
        while sent < n:
            while len(storage._messages) >= window:
                storage.room.clear()
                await storage.room.wait()
            while sent < n and len(storage._messages) < window:
                client.publish(TOPIC, payload, qos=1)
                sent += 1
            await asyncio.sleep(0)
        await asyncio.wait_for(storage.wait_empty(), 60)
        t1, c1 = time.perf_counter(), _cpu()
        await client.disconnect()
        return {"seconds": t1 - t0, "cpu_s": c1 - c0}

    return asyncio.run(main())


RUNNERS: dict[str, Callable[[int, int, int], dict[str, Any]]] = {
    "uplink_v4": lambda p, n, s: run_uplink(p, n, s, 4, False),
    "uplink_v5": lambda p, n, s: run_uplink(p, n, s, 5, False),
    "uplink_v5_uvloop": lambda p, n, s: run_uplink(p, n, s, 5, True),
    "paho_v4": lambda p, n, s: run_paho(p, n, s, 4),
    "paho_v5": lambda p, n, s: run_paho(p, n, s, 5),
    "gmqtt_v4": lambda p, n, s: run_gmqtt(p, n, s, 4),
    "gmqtt_v5": lambda p, n, s: run_gmqtt(p, n, s, 5),
}


# --------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _start_mosquitto(tmp: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    conf = os.path.join(tmp, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                "log_dest none\nset_tcp_nodelay true\nmax_inflight_messages 100\n")
    proc = subprocess.Popen(["/usr/sbin/mosquitto", "-c", conf], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _one_run(name: str, port: int, n: int, size: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--port", str(port),
           "--messages", str(n), "--size", str(size)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(RUNNERS[args.child](args.port, args.messages, args.size)))
        return

    report: dict[str, Any] = {
        "benchmark": "uplink_clients",
        "messages": args.messages, "payload_bytes": args.size, "qos": 1, "window": WINDOW,
        "repeat": args.repeat, "python": platform.python_version(),
        "cpus": os.cpu_count(), "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = _start_mosquitto(tmp)
        try:
            for name in args.clients.split(","):
                runs = []
                for _ in range(args.repeat):
                    b0 = _proc_cpu(proc.pid)
                    r = _one_run(name, port, args.messages, args.size)
                    r["broker_cpu_s"] = _proc_cpu(proc.pid) - b0
                    runs.append(r)
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    report["results"][name] = {"error": runs[0]["error"]}
                    continue
                rates = [args.messages / r["seconds"] for r in ok]
                med = sorted(ok, key=lambda r: r["seconds"])[len(ok) // 2]
                report["results"][name] = {
                    "msg_per_s": round(statistics.median(rates)),
                    "runs_msg_per_s": [round(x) for x in rates],
                    "client_cpu_pct": round(100 * med["cpu_s"] / med["seconds"]),
                    # whole child run (connect included): an upper bound
                    "broker_cpu_pct": round(100 * med["broker_cpu_s"] / med["seconds"]),
                    **({"max_inflight": med["max_inflight"]} if "max_inflight" in med else {}),
                }
        finally:
            proc.terminate()
            proc.wait(5)
    base = report["results"].get("paho_v4", {}).get("msg_per_s")
    if base:
        for r in report["results"].values():
            if "msg_per_s" in r:
                r["vs_paho_v4"] = round(r["msg_per_s"] / base, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
