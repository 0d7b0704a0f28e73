"""Command line of the cloud side: ``rapidmq-edge cloud ingest ...``.

Exit code: 0 when everything received was verified and nothing is missing, 1 when anything
was reported (tampered, unverifiable, wrong key, missing message or batch, chain broken,
replay), 2 on a usage or key error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

__all__ = ["handles", "register", "run"]

#: report kinds that are not failures
_BENIGN = {"verified", "batches", "sessions", "duplicates", "received"}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``cloud`` to the top-level subparsers."""
    cloud = sub.add_parser("cloud", help="cloud-side consumer of protected forwarded data")
    csub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")
    p = csub.add_parser("ingest", help="subscribe, verify batches, decrypt, write, report")
    p.add_argument("--source", choices=("mqtt", "jetstream"), default="mqtt",
                   help="mqtt: a persistent MQTT session on --upstream (default); jetstream: "
                        "a durable pull consumer on the NATS cluster's own MQTT stream")
    p.add_argument("--upstream", metavar="URL", help="mqtt://host:port (--source mqtt)")
    p.add_argument("--servers", metavar="URLS",
                   help="jetstream: nats://a:4222,nats://b:4222,... (the cluster's nodes)")
    p.add_argument("--stream", default="$MQTT_msgs",
                   help="jetstream: the stream to read (default: %(default)s, where NATS' "
                        "MQTT listener keeps QoS 1 messages)")
    p.add_argument("--durable", metavar="NAME",
                   help="jetstream: the durable consumer; N processes with one NAME share it")
    p.add_argument("--ack-wait", type=float, default=10.0, metavar="S",
                   help="jetstream: a fetched message not acknowledged (committed) within S "
                        "seconds is redelivered, to any consumer (default: %(default)s)")
    p.add_argument("--max-ack-pending", type=int, default=4096, metavar="N",
                   help="jetstream: bound of fetched, unacknowledged messages across the "
                        "durable (default: %(default)s)")
    p.add_argument("--keys-dir", required=True, type=Path, metavar="DIR",
                   help="recipient keys (keys init --recipient) and trusted identity keys")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="FILE",
                   help="gateway identity COSE_Key to trust (keys export-public identity)")
    p.add_argument("--out", required=True, metavar="FILE|URL",
                   help="verified messages: FILE.jsonl, FILE.sqlite or postgresql://...")
    p.add_argument("--reports", type=Path, metavar="FILE", help="reports as JSON lines")
    p.add_argument("--prefix", default="edge/{gateway_id}/",
                   help="the gateways' upstream topic prefix (default: %(default)s)")
    p.add_argument("--group", metavar="NAME", help="shared-subscription group (scale out)")
    p.add_argument("--client-id", metavar="ID")
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--grace", type=float, default=5.0, metavar="S",
                   help="wait this long for a batch / message / session before reporting")
    p.add_argument("--chain-start", type=int, metavar="SEQ",
                   help="first batch seq expected (default: the first one seen)")
    p.add_argument("--idle-exit", type=float, metavar="S",
                   help="exit after S seconds without traffic (default: run until signalled)")
    p.add_argument("--session-expiry", type=int, default=7 * 86400, metavar="S",
                   help="persistent session: the broker keeps unacknowledged messages this "
                        "long (0: clean session; default: %(default)s)")
    p.add_argument("--protocol", type=int, choices=(4, 5), default=5,
                   help="MQTT 5 (default) or 3.1.1 (4)")
    p.add_argument("--batch-timeout", type=float, default=300.0, metavar="S",
                   help="report a message no signed batch covers as missing-batch after S "
                        "seconds (default: %(default)s)")
    p.add_argument("--max-pending", type=int, default=100_000, metavar="N",
                   help="bound of the messages waiting for their batch (default: %(default)s)")
    p.add_argument("--partition", metavar="I/N",
                   help="handle only the gateways that hash to I of N (brokers without $share)")
    p.add_argument("--lease", type=float, default=60.0, metavar="S",
                   help="adopt the waiting messages of a consumer silent this long")


def _partition(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, _, n = text.partition("/")
    index, count = int(i), int(n)
    if not 0 <= index < count:
        raise SystemExit(f"--partition {text}: want I/N with 0 <= I < N")
    return index, count


def handles(command: str) -> bool:
    """True for the commands this module runs."""
    return command == "cloud"


def run(args: argparse.Namespace) -> int:
    """Execute ``cloud ingest``."""
    from ..cloud.ingest import IngestOptions, run_ingest
    from ..crypto.errors import CryptoError

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    out = args.out if "://" in args.out else Path(args.out)
    if args.source == "mqtt" and not args.upstream:
        print("rapidmq-edge cloud ingest: --upstream URL is required with --source mqtt",
              file=sys.stderr)
        return 2
    if args.source == "jetstream" and not (args.servers and args.durable):
        print("rapidmq-edge cloud ingest: --source jetstream needs --servers URLS and "
              "--durable NAME", file=sys.stderr)
        return 2
    opts = IngestOptions(
        upstream=args.upstream or "", source=args.source,
        servers=tuple(u.strip() for u in (args.servers or "").split(",") if u.strip()),
        stream=args.stream, durable=args.durable, ack_wait=args.ack_wait,
        max_ack_pending=args.max_ack_pending,
        keys_dir=args.keys_dir, out=out, trust=tuple(args.trust),
        prefix=args.prefix, group=args.group, client_id=args.client_id,
        username=args.username, password=args.password, reports=args.reports,
        grace=args.grace, chain_start=args.chain_start, idle_exit=args.idle_exit,
        session_expiry=args.session_expiry, protocol=args.protocol,
        batch_timeout=args.batch_timeout, max_pending=args.max_pending, lease=args.lease,
        partition=_partition(args.partition),
    )

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        task = asyncio.ensure_future(run_ingest(opts, stop=stop, ready=ready))
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            print("cloud ingest: subscribed", file=sys.stderr, flush=True)  # tests wait for it
        waiter.cancel()
        return await task

    try:
        counts = asyncio.run(main())
    except (CryptoError, OSError, ValueError) as exc:
        print(f"rapidmq-edge cloud ingest: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not type(exc).__module__.startswith(("asyncpg", "nats")):
            raise
        peer = "PostgreSQL" if type(exc).__module__.startswith("asyncpg") else "NATS"
        print(f"rapidmq-edge cloud ingest: {peer}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts, sort_keys=True))
    return 1 if any(v for k, v in counts.items() if k not in _BENIGN) else 0
