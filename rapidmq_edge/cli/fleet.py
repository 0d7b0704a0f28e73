"""Command line of the fleet view: ``rapidmq-edge fleet status --url mqtt://cluster``.

Subscribes to the gateways' retained statuses (``[fleet] topic``, one level per gateway),
collects what arrives within ``--wait`` seconds after the subscription and prints a table
(or ``--json``). Exit code 0; 1 when the cluster cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

__all__ = ["collect", "handles", "register", "run"]

DEFAULT_FILTER = "rapidmq/fleet/+"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``fleet`` to the top-level subparsers."""
    fleet = sub.add_parser("fleet", help="the gateways publishing their status upstream")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    p = fsub.add_parser("status", help="list the fleet from its retained statuses")
    p.add_argument("--url", required=True, metavar="URL", help="mqtt://host:port of the cluster")
    p.add_argument("--topic", default=DEFAULT_FILTER, metavar="FILTER",
                   help="topic filter of the statuses (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--wait", type=float, default=1.0, metavar="S",
                   help="collect for S seconds after subscribing (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="give up when not subscribed within S seconds (default: %(default)s)")
    p.add_argument("--username")
    p.add_argument("--password")


def handles(command: str) -> bool:
    return command == "fleet"


async def collect(url: str, topic: str, wait: float, timeout: float,
                  username: str | None = None,
                  password: str | None = None) -> dict[str, dict[str, Any]]:
    """Topic -> status of every gateway whose status arrives within ``wait`` s after the
    subscription (retained ones come at once). Raises TimeoutError when not subscribed
    within ``timeout`` s."""
    from ..cloud.subscriber import Subscriber

    found: dict[str, dict[str, Any]] = {}

    def on_publish(t: str, payload: bytes, _props: dict[str, str]) -> None:
        if not payload:  # a cleared retained status
            found.pop(t, None)
            return
        with contextlib.suppress(ValueError):
            doc = json.loads(payload)
            if isinstance(doc, dict):
                found[t] = doc

    sub = Subscriber(url, f"rapidmq-fleet-{os.getpid()}", [(topic, 1)], on_publish,
                     username=username, password=password)
    task = asyncio.get_running_loop().create_task(sub.run())
    try:
        await asyncio.wait_for(sub.subscribed.wait(), timeout)
        await asyncio.sleep(wait)
    finally:
        sub.stop()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
    return found


def run(args: argparse.Namespace) -> int:
    """``fleet status``."""
    from ..ops.fleet import fleet_table

    try:
        found = asyncio.run(collect(args.url, args.topic, args.wait, args.timeout,
                                    args.username, args.password))
    except ValueError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"fleet: no subscription on {args.url} within {args.timeout} s",
              file=sys.stderr)
        return 1
    statuses = [{**doc, "id": doc.get("id") or t.rsplit("/", 1)[-1]} for t, doc in found.items()]
    if args.json:
        print(json.dumps(sorted(statuses, key=lambda s: str(s["id"])), indent=1))
    else:
        print(fleet_table(statuses) if statuses else f"no gateway status on {args.topic}")
    return 0
