"""The long chaos run on the 3-node NATS JetStream cluster (issue 16, part 4).

tests/cloud_nats.py's run, longer than CI's: ``--messages`` at ``--rate`` msg/s from QoS 1
devices through a real gateway (encrypt + sign, MQTT 3.1.1 upstream: id frame) to the NATS
cluster and 2 ``--partition`` consumers into PostgreSQL, with ``--rounds`` x (the gateway's
node, the gateway, the owning consumer: SIGKILL and restart). Side by side in the same
invocation: the same run with the node kills left out (the reference: what the path keeps
when the cluster stays up). Per run: sent / device-acknowledged / rows / lost (acknowledged,
no row) / reported missing / duplicated / unencrypted / other reports / seconds.

``--source``: the consumers' source, side by side in one invocation by default: ``mqtt`` (a
3.1.1 session each, ``--partition I/2``) and ``jetstream`` (both pull from one durable on the
cluster's ``$MQTT_msgs`` stream). ``--no-reference`` leaves the runs without node kills out.

Prints one JSON document with ``loadavg_before_after`` (2 shared cores).

    python3 bench/cloud_chaos.py [--messages 3000] [--rate 200] [--rounds 2]
        [--source mqtt,jetstream] [--no-reference] [--seed 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--source", default="mqtt,jetstream",
                    help="comma-separated: mqtt, jetstream (default: both)")
    ap.add_argument("--no-reference", action="store_true",
                    help="only the runs with node kills")
    args = ap.parse_args()

    from tests.cloud_helpers import PgServer, pg_bin
    from tests.cloud_nats import nats_available, run_nats_chaos
    from tests.conftest import free_port

    assert nats_available(), "nats-server not installed"
    binary = pg_bin()
    assert binary is not None, "PostgreSQL not installed"
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rmq-cloud-chaos-"))
    pgbase = Path(tempfile.mkdtemp(prefix="rmq-pg-"))
    root = os.geteuid() == 0
    if root:
        shutil.chown(pgbase, "postgres", "postgres")
    pg = PgServer(pgbase, free_port(), binary, root)
    runs: list[dict[str, Any]] = []
    try:
        pg.start()
        plans = [("node+gateway+consumer", ("node", "gateway", "consumer"))]
        if not args.no_reference:
            plans.append(("gateway+consumer (reference)", ("gateway", "consumer")))
        for name, kinds in plans:
            for source in args.source.split(","):
                run = tmp / f"{source}-{name.split(' ')[0].replace('+', '-')}"
                run.mkdir()
                res = run_nats_chaos(run, pg.create_db(), messages=args.messages,
                                     rate=args.rate, rounds=args.rounds, seed=args.seed,
                                     settle=90.0, batch_timeout=30.0, observe=True,
                                     kinds=kinds, source=source)
                runs.append(dict(res.summary(), run=name, source=source, silent=res.silent,
                                 other_reports=sorted({r[0] for r in res.unexpected_reports})))
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"bench": "cloud_chaos", "broker": "nats-server 3-node JetStream (MQTT)",
                      "runs": runs, "cores": os.cpu_count(),
                      "loadavg_before_after": [round(load0[0], 2),
                                               round(os.getloadavg()[0], 2)]}, indent=1))


if __name__ == "__main__":
    main()
