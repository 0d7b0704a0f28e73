"""What the /metrics counters cost (issue 15): the MQTT hot path with the new per-QoS,
no-subscriber and drop counters beside the same gateway before them, and the time of one
``/metrics`` scrape.

Method: the reference is the source tree at ``--ref`` (default: the commit before the
counters), extracted with ``git archive`` and run
from its own directory; both gateways are driven alternately by ``bench/mqtt_throughput.py``'s
load generator (QoS 0 and QoS 1, 1 -> 1, 64 B), ``--repeat`` times each, median kept. Then
``--scrapes`` scrapes of ``/metrics`` on the current gateway with ``--clients`` idle
clients connected. Prints one JSON document with the load average.

    python3 bench/metrics_cost.py [--repeat 5] [--ref COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import loadgen  # noqa: E402
from bench.mqtt_throughput import HOST, REPO, Broker, Options, run_flow  # noqa: E402

DEFAULT_REF = "ada423e^"  # the tree before the /metrics counters


def _extract(ref: str, into: Path) -> Path:
    """``rapidmq_edge/`` of ``ref`` under ``into``, without compiled extensions (the
    plain MQTT path uses none; a kernel built from other sources would not load)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "rapidmq_edge"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "rapidmq_edge"


class RefBroker(Broker):
    """A gateway run from the reference tree: its directory holds ``rapidmq_edge`` (the
    working directory comes first on ``python -m``'s path)."""

    ref_pkg: Path | None = None

    def _command(self) -> list[str]:
        cmd = super()._command()
        link = self.workdir / "rapidmq_edge"
        if self.ref_pkg is not None and not link.exists():
            link.symlink_to(self.ref_pkg, target_is_directory=True)
        return cmd


def _scrapes(n: int, clients: int, tmp: Path) -> dict[str, Any]:
    http = _free_port()
    mqtt = _free_port()
    conf = tmp / "scrape.toml"
    conf.write_text(f'[gateway]\nid = "bench"\ndata_dir = "{tmp / "scrape-data"}"\n'
                    f'[mqtt]\nlisten = ["tcp://{HOST}:{mqtt}"]\n[auth]\nallow_anonymous = true\n'
                    f'[http]\nlisten = ["http://{HOST}:{http}"]\n')
    proc = subprocess.Popen([sys.executable, "-m", "rapidmq_edge", "run", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    socks = []
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socks.append(loadgen.open_client(HOST, mqtt, "probe", timeout=1.0))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for i in range(clients):
            socks.append(loadgen.open_client(HOST, mqtt, f"idle-{i}", timeout=2.0))
        url = f"http://{HOST}:{http}/metrics"
        times, size = [], 0
        for _ in range(n):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as resp:
                size = len(resp.read())
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        return {"scrapes": n, "clients": clients, "bytes": size,
                "p50_ms": round(times[len(times) // 2], 2),
                "p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}
    finally:
        for s in socks:
            loadgen.close_quietly(s)
        proc.terminate()
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default=DEFAULT_REF)
    ap.add_argument("--current", default="",
                    help="a commit to compare instead of the working tree (e.g. ada423e: the "
                         "counters alone, without later changes)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--qos1-messages", type=int, default=30_000)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--clients", type=int, default=200)
    args = ap.parse_args()
    opts = Options(args.messages, args.qos1_messages, 0, 50, 1000.0, 5.0, 0, 120.0, False,
                   0.5, 1, 0.5)
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as t:
        tmp = Path(t)
        ref_pkg = _extract(args.ref, tmp / "ref")
        cur = RefBroker("current", "rapidmq", tmp / "cur", "", sys.executable, 20.0)
        if args.current:
            cur.ref_pkg = _extract(args.current, tmp / "cur-src")
        ref = RefBroker("reference", "rapidmq", tmp / "refrun", "", sys.executable, 20.0)
        ref.ref_pkg = ref_pkg
        out: dict[str, Any] = {"ref": args.ref, "current": args.current or "working tree",
                               "repeat": args.repeat, "scenarios": {}}
        try:
            for b in (ref, cur):
                if not b.start():
                    raise SystemExit(f"{b.name}: {b.error}")
            for name, qos, n in (("qos0_1to1_64B", 0, args.messages),
                                 ("qos1_1to1_64B", 1, args.qos1_messages)):
                runs: dict[str, list[float]] = {"current": [], "reference": []}
                for _ in range(args.repeat):
                    for b in (ref, cur):  # alternating: drift hits both
                        if not b.ensure():
                            raise SystemExit(f"{b.name}: {b.error}")
                        r = run_flow(b, opts, qos=qos, size=64, messages=n)
                        runs[b.name].append(float(r["msg_per_s"]))
                med = {k: statistics.median(v) for k, v in runs.items()}
                out["scenarios"][name] = {
                    "current_msg_per_s": round(med["current"]),
                    "reference_msg_per_s": round(med["reference"]),
                    "change_pct": round((med["current"] / med["reference"] - 1) * 100, 2),
                    "runs": {k: [round(x) for x in v] for k, v in runs.items()},
                }
        finally:
            cur.stop()
            ref.stop()
        out["scrape"] = _scrapes(args.scrapes, args.clients, tmp)
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    out["cpus"] = os.cpu_count()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
