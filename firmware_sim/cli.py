"""Command line of the fleet simulator (``python -m firmware_sim`` / ``rapidmq-edge-sim``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .generator import generate
from .runner import RunnerConfig, run_fleet, write_labels
from .scenario import Scenario


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the simulator."""
    ap = argparse.ArgumentParser(
        prog="rapidmq-edge-sim",
        description="Drive a simulated device fleet (MQTT + CoAP) against a RapidMQ Edge "
                    "gateway and write the ground-truth labels beside the run.")
    d = Scenario()
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--devices", type=int, default=d.devices)
    ap.add_argument("--duration", type=float, default=d.duration,
                    help="simulated seconds (default %(default)s)")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="simulated seconds per wall second (default %(default)s)")
    ap.add_argument("--coap-fraction", type=float, default=d.coap_fraction)
    ap.add_argument("--fault-rate", type=float, default=d.fault_rate,
                    help="faults per sensor stream and simulated hour")
    ap.add_argument("--outage-rate", type=float, default=d.outage_rate,
                    help="outages per device and simulated hour")
    ap.add_argument("--attackers", type=int, default=d.attackers)
    ap.add_argument("--misconfigured", type=int, default=d.misconfigured)
    ap.add_argument("--dashboards", type=int, default=d.dashboards)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883, help="gateway MQTT port")
    ap.add_argument("--coap-port", type=int, default=None,
                    help="gateway CoAP UDP port (CoAP devices stay silent without it)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for labels.jsonl, clients.jsonl, outages.jsonl, run.json, "
                         "stats.json")
    ap.add_argument("--e2e-recipient", type=Path, default=None, metavar="FILE",
                    help="seal device payloads end to end (HPKE) to this cloud recipient "
                         "COSE_Key (keys export-public recipient --out FILE)")
    ap.add_argument("--dry-run", action="store_true",
                    help="generate and write the labels only, send nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints the run statistics as JSON."""
    args = build_parser().parse_args(argv)
    if args.devices < 0 or args.duration <= 0 or args.time_scale <= 0:
        print("error: --devices must be >= 0, --duration and --time-scale > 0", file=sys.stderr)
        return 2
    if not 0.0 <= args.coap_fraction <= 1.0:
        print("error: --coap-fraction must be within [0, 1]", file=sys.stderr)
        return 2
    sc = Scenario(seed=args.seed, devices=args.devices, duration=args.duration,
                  coap_fraction=args.coap_fraction, fault_rate=args.fault_rate,
                  outage_rate=args.outage_rate, attackers=args.attackers,
                  misconfigured=args.misconfigured, dashboards=args.dashboards)
    run = generate(sc)
    if args.dry_run:
        if args.out is not None:
            write_labels(run, args.out, args.time_scale)
        print(json.dumps({"messages": len(run.messages), "actions": len(run.actions),
                          "outages": len(run.outages), "devices": len(run.devices)}))
        return 0
    cfg = RunnerConfig(host=args.host, port=args.port, coap_port=args.coap_port,
                       time_scale=args.time_scale, out_dir=args.out)
    if args.e2e_recipient is not None:
        from .e2e import DeviceSealer

        cfg.e2e = DeviceSealer.from_file(args.e2e_recipient)
    try:
        stats = asyncio.run(run_fleet(run, cfg))
    except KeyboardInterrupt:
        return 130
    print(json.dumps(asdict(stats)))
    return 0 if not stats.connect_errors else 1
