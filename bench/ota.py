"""OTA across a fleet and under load: how long from publish to active, bytes on the wire per
gateway against the payload, and the PUBACK p99 a device sees while a model is in shadow and
swapped, beside the same device's p99 just before (same invocation).

    .venv/bin/python bench/ota.py [--gateways 20] [--rate 2000] [--out FILE]

Part 1 (fleet): ``--gateways`` gateway processes on one Mosquitto, each with a device at
``--fleet-rate`` msg/s (the shadow needs traffic); the operator CLI signs the shipped priority
model as a new sequence and (a) publishes it to the class at once, then (b) rolls the next
sequence out in stages 1 / 10 % / 50 % / 100 %. Time until every gateway reports it active
(the operator's fleet view); Mosquitto's ``$SYS/broker/bytes/sent`` during (a) over the
gateways (the gateways forward to Mosquitto but nothing subscribes to that: what it sends is
the OTA traffic, plus the operator's view).
Part 2 (swap): one gateway, bench/loadgen.py's paced QoS 1 publisher at ``--rate`` msg/s and
its latency subscriber on the upstream: latency device -> upstream over ``--seconds`` without
an update (reference) and with one published 1.5 s in (shadow and swap inside the run),
alternating for ``--rounds``. Prints JSON with the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rapidmq_edge.ota.operator import Cluster, fleet_view, publish_signed  # noqa: E402

HOST = "127.0.0.1"
CLASS = "bench"
V2 = mqtt.CallbackAPIVersion.VERSION2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args[:2])}: {out.stderr or out.stdout}")
    return out.stdout


class Mosquitto:
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {HOST}\nallow_anonymous true\n"
                        "persistence false\nlog_dest none\nsys_interval 1\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto",
                                      "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        _wait_port(self.port)
        self.sent = 0.0
        self._sys = mqtt.Client(V2, client_id="bench-sys")
        self._sys.on_message = self._on_sys
        self._sys.connect(HOST, self.port)
        self._sys.subscribe("$SYS/broker/bytes/sent")
        self._sys.loop_start()

    def _on_sys(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        self.sent = float(m.payload)

    def stop(self) -> None:
        self._sys.loop_stop()
        self.proc.terminate()
        self.proc.wait(10)


class Gateway:
    def __init__(self, tmp: Path, gid: str, up_port: int, trust: Path,
                 forward: str = "sensors/#") -> None:
        self.id = gid
        self.port = _free_port()
        self.dir = tmp / gid
        self.dir.mkdir()
        doc = {
            "gateway": {"id": gid, "data_dir": str(self.dir / "data")},
            "mqtt": {"listen": [f"tcp://{HOST}:{self.port}"], "sys_interval": 0},
            "auth": {"allow_anonymous": True},
            "upstream": [{"name": "cloud", "urls": [f"mqtt://{HOST}:{up_port}"]}],
            "forward": [{"filter": forward, "upstream": "cloud", "qos": 1}],
            "intelligence": {"enabled": True, "anomaly": "off", "threat": "off",
                             "health": False},
            "ota": {"enabled": True, "trust": [str(trust)], "gateway_class": CLASS},
        }
        conf = self.dir / "gateway.toml"
        conf.write_text(tomli_w.dumps(doc))
        self.log = open(self.dir / "gateway.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rapidmq_edge", "run", "--config", str(conf)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Devices:
    """One paho device per gateway, publishing QoS 1 readings at ``rate`` msg/s each;
    PUBACK latencies (ms) with their send times."""

    def __init__(self, ports: list[int], rate: float) -> None:
        self.rate = rate
        self.lat: list[tuple[float, float]] = []
        self._sent: dict[tuple[int, int], float] = {}
        self._early: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()
        self.clients = []
        for i, port in enumerate(ports):
            c = mqtt.Client(V2, client_id=f"dev-{i}", protocol=mqtt.MQTTv311)
            c.max_inflight_messages_set(1000)
            c.on_publish = self._acked(i)
            c.connect(HOST, port)
            c.loop_start()
            self.clients.append(c)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _acked(self, i: int) -> Any:
        def on_publish(c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
            now = time.monotonic()
            with self._lock:
                t = self._sent.pop((i, mid), None)
                if t is not None:
                    self.lat.append((t, (now - t) * 1000.0))
                else:  # acknowledged before its send time was recorded
                    self._early[(i, mid)] = now
        return on_publish

    def _run(self) -> None:
        k = 0
        t0 = time.monotonic()
        while not self.stop.is_set():
            for i, c in enumerate(self.clients):
                now = time.monotonic()
                # not under the lock: publish() may wait for in-flight room, which the
                # network thread's acknowledgements (taking the lock) make
                info = c.publish(f"sensors/{k % 7}/t",
                                 json.dumps({"value": 20 + k % 5, "seq": k}), qos=1)
                with self._lock:
                    acked = self._early.pop((i, info.mid), None)
                    if acked is None:
                        self._sent[(i, info.mid)] = now
                    else:
                        self.lat.append((now, (acked - now) * 1000.0))
            k += 1
            ahead = t0 + k / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.clients:
            c.loop_stop()
            c.disconnect()


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


async def _until_active(cluster: Cluster, gateways: list[str], sequence: int,
                        timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        view = await fleet_view(cluster, wait=0.6)
        done = {r.gateway for r in view.reports("priority")
                if r.state == "active" and r.sequence == sequence}
        if set(gateways) <= done:
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    raise TimeoutError(f"not every gateway active with sequence {sequence}")


def _sign(keys: Path, model: Path, seq: int, out: Path, gate: list[str]) -> tuple[Path, Path]:
    args = ["ota", "sign", "--key", str(keys / "operator-mldsa65.key"), "--component",
            "priority", "--sequence", str(seq), "--model", str(model), "--model-version",
            f"1.0.{seq}", "--class", CLASS, "--min-version", "0.1", "--out", str(out)]
    for g in gate:
        args += ["--gate", g]
    _cli(*args)
    return out / f"priority-{seq}.manifest", out / f"priority-{seq}.payload"


def fleet_part(tmp: Path, n: int, rate: float, keys: Path, model: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp)
    gws = [Gateway(tmp, f"gw-{i:02d}", broker.port, keys / "operator-mldsa65.pub")
           for i in range(n)]
    devices = None
    try:
        for g in gws:
            _wait_port(g.port, 60)
        devices = Devices([g.port for g in gws], rate)
        cluster = Cluster([f"mqtt://{HOST}:{broker.port}"])
        ids = [f"gw-{i:02d}" for i in range(n)]
        gate = ["min_messages=50", "min_seconds=1"]
        a = _sign(keys, model, 2, tmp / "signed", gate)
        b = _sign(keys, model, 3, tmp / "signed", gate)
        payload = a[1].stat().st_size
        time.sleep(3.0)  # presence and idle states retained; $SYS has ticked
        sent0 = broker.sent
        t0 = time.monotonic()
        _cli("ota", "publish", "--url", f"mqtt://{HOST}:{broker.port}", "--manifest",
             str(a[0]), "--payload", str(a[1]))
        publish_s = time.monotonic() - t0
        all_at_once = publish_s + asyncio.run(_until_active(cluster, ids, 2, 300))
        time.sleep(2.5)  # the last $SYS tick
        per_gateway = (broker.sent - sent0) / n
        t0 = time.monotonic()
        _cli("ota", "rollout", "--url", f"mqtt://{HOST}:{broker.port}", "--manifest",
             str(b[0]), "--payload", str(b[1]), "--stages", "1,10%,50%,100%")
        staged = time.monotonic() - t0
        return {"gateways": n, "device_rate_each": rate, "payload_bytes": payload,
                "publish_to_all_active_s": round(all_at_once, 2),
                "chunks_published_s": round(publish_s, 2),
                "staged_rollout_s": round(staged, 2),
                "broker_bytes_sent_per_gateway": round(per_gateway),
                "wire_over_payload": round(per_gateway / payload, 3)}
    finally:
        if devices is not None:
            devices.close()
        for g in gws:
            g.stop()
        broker.stop()


def _one_swap_run(tmp: Path, rate: float, seconds: float, keys: Path,
                  signed: tuple[Path, Path] | None) -> dict[str, Any]:
    """One gateway, bench/loadgen.py's paced QoS 1 publisher at ``rate`` and its latency
    subscriber on the upstream (separate processes); with ``signed``, the update is published
    1.5 s in (its gate makes shadow + swap fall inside the run)."""
    import mqtt_throughput as mt
    from store_forward import _recv, start_subscriber

    broker = Mosquitto(tmp)
    gw = Gateway(tmp, f"gw-swap-{time.monotonic_ns()}", broker.port,
                 keys / "operator-mldsa65.pub", forward="#")
    procs: list[Any] = []
    took: list[float] = []
    try:
        _wait_port(gw.port, 60)
        n = int(rate * seconds)
        sproc, spipe = start_subscriber(broker.port, f"edge/{gw.id}/#", n, latency=True,
                                        start_timeout=15.0, idle_timeout=5.0,
                                        max_seconds=seconds * 3 + 20, client_prefix="ota-sub",
                                        json_stamp=True)
        procs.append(sproc)
        pproc, ppipe = mt._spawn("paced", {
            "host": HOST, "port": gw.port, "topic": "plant/line1/dev7/temp", "qos": 1,
            "rate": rate, "seconds": seconds, "size": 64, "client_id": "ota-paced",
            "json_stamp": True}, None)
        procs.append(pproc)
        if signed is not None:
            def update() -> None:
                time.sleep(1.5)
                cluster = Cluster([f"mqtt://{HOST}:{broker.port}"])
                t0 = time.monotonic()
                asyncio.run(publish_signed(cluster, signed[0], signed[1]))
                took.append(time.monotonic() - t0 + asyncio.run(
                    _until_active(cluster, [gw.id], 2, seconds * 3)))
            th = threading.Thread(target=update, daemon=True)
            th.start()
        _recv(ppipe, seconds * 3 + 20, "paced publisher")
        sub = _recv(spipe, seconds * 3 + 25, "subscriber")
        if signed is not None:
            th.join(seconds * 3)
        lat = sub.get("latency_ms", {})
        return {"messages": n, "received": sub.get("received"),
                **{k: lat[k] for k in ("p50", "p99", "max") if k in lat},
                **({"publish_to_active_s": round(took[0], 2) if took else None}
                   if signed is not None else {})}
    finally:
        mt._reap(procs)
        gw.stop()
        broker.stop()


def swap_part(tmp: Path, rate: float, seconds: float, keys: Path, model: Path,
              rounds: int) -> dict[str, Any]:
    """Reference runs (no update) and update runs, alternating; latency device -> upstream."""
    sys.path.insert(0, str(ROOT / "bench"))
    signed = _sign(keys, model, 2, tmp / "signed-swap",
                   ["min_messages=2000", f"min_seconds={max(1.0, seconds / 3):.1f}"])
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "rounds": []}
    for _ in range(rounds):
        ref = _one_swap_run(tmp, rate, seconds, keys, None)
        upd = _one_swap_run(tmp, rate, seconds, keys, signed)
        out["rounds"].append({"reference": ref, "update": upd,
                              "added_p99_ms": round(upd["p99"] - ref["p99"], 3)
                              if "p99" in upd and "p99" in ref else None})
    added = sorted(r["added_p99_ms"] for r in out["rounds"] if r["added_p99_ms"] is not None)
    out["median_added_p99_ms"] = added[len(added) // 2] if added else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gateways", type=int, default=20)
    ap.add_argument("--fleet-rate", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="rapidmq-ota-bench-"))
    try:
        keys = tmp / "keys"
        _cli("ota", "keys", "init", "--out", str(keys))
        model = tmp / "priority.onnx"
        shutil.copy(ROOT / "models" / "priority.onnx", model)
        doc = {"swap": swap_part(tmp, a.rate, a.seconds, keys, model, a.rounds),
               "fleet": fleet_part(tmp, a.gateways, a.fleet_rate, keys, model),
               "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(doc, indent=1)
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
