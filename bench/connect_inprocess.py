"""The gateway's Python cost per connect + subscribe, without sockets: CPU µs per client.

Each round starts one subprocess per source tree (``--tree ROLE=PATH``, the working tree as
``after``), in turn; each builds a ``Gateway`` from a minimal MQTT-only config (not started:
no listener) and drives ``--clients`` connections through the real ``MqttStreamProtocol``
on a stub transport (``peername``, ``write``), each fed the bytes ``bench/connect_storm.py``
sends (CONNECT 3.1.1 + SUBSCRIBE QoS 0 in one read), yielding to the uvloop event loop every
64 clients as the storm's window does; it checks every client got its CONNACK + SUBACK (9
bytes), then drops them. The figure is process CPU time per client over the connects (the
flushes included, the teardown not), median of the batches after the first.

What it leaves out is what ``bench/connect_storm.py`` adds: the kernel, uvloop's accept,
transport and read/write (22-26 µs per client for a bare uvloop server, docs/benchmarks.md).

    python bench/connect_inprocess.py --tree before=/tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, gc, json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import uvloop
from connect_storm import handshake_bytes
from inprocess import StubTransport, attach, build_gateway

async def main(clients, batches):
    gw = build_gateway(max_connections=1000000)
    gc.collect()
    gc.freeze()  # as gateway/process.py does once started
    per = []
    for b in range(batches):
        data = [handshake_bytes(f"c{b}-{i}", f"bench/storm/{i}") for i in range(clients)]
        conns = []
        t0 = time.process_time()
        for i in range(clients):
            p = attach(gw, StubTransport())
            p.data_received(data[i])
            conns.append(p)
            if i % 64 == 63:
                await asyncio.sleep(0)
        await asyncio.sleep(0)
        per.append((time.process_time() - t0) / clients * 1e6)
        bad = sum(1 for p in conns if p.conn is None or p.conn.transport.n != 9)
        if bad:
            raise SystemExit(f"{bad} clients without CONNACK + SUBACK")
        for p in conns:
            p.connection_lost(None)
        await asyncio.sleep(0.05)
    print(json.dumps({"us_per_client": round(statistics.median(per[1:]), 2),
                      "batches": [round(x, 2) for x in per]}))

uvloop.run(main(int(sys.argv[3]), int(sys.argv[4])))
"""


def run_tree(path: Path, clients: int, batches: int, python: str) -> dict[str, object]:
    """One subprocess on the tree at ``path``: its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    out = subprocess.run([python, "-c", CHILD, str(path), str(REPO / "bench"), str(clients),
                          str(batches)], capture_output=True, text=True, env=env, timeout=300,
                         check=True, cwd=str(path))
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="ROLE=PATH",
                    help="also measure the source tree PATH as ROLE (run first in each round)")
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--batches", type=int, default=5, help="per subprocess (the first dropped)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    trees: dict[str, Path] = {}
    for spec in args.tree:
        role, _, path = spec.partition("=")
        trees[role] = Path(path)
    trees["after"] = REPO
    runs: dict[str, list[float]] = {role: [] for role in trees}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for role, path in trees.items():
            r = run_tree(path, args.clients, args.batches, args.python)
            runs[role].append(float(r["us_per_client"]))  # type: ignore[arg-type]
            loads.append(os.getloadavg()[0])
    print(json.dumps({
        "clients": args.clients,
        "us_per_client_median": {role: round(statistics.median(v), 2) for role, v in runs.items()},
        "us_per_client_runs": runs,
        "loadavg_1m": [round(x, 2) for x in loads],
        "trees": {role: str(p) for role, p in trees.items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
