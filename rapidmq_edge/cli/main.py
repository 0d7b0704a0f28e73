"""Command line: ``rapidmq-edge run | check-config | status | user | token | oscore | role |
group | erase | keys | audit | cloud | ota``; one module per command family, each with ``register``,
``handles``, ``run``.

Exit codes: 0 success, 1 runtime failure (e.g. unknown user), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import accounts, cloud, erase, fleet, gateway, keys, model, ota, rbac

__all__ = ["build_parser", "main"]

#: the command families, in the order ``--help`` lists them
FAMILIES = (gateway, accounts, rbac, erase, keys, cloud, ota, model, fleet)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="rapidmq-edge", description="RapidMQ Edge IoT gateway and MQTT broker."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        for family in FAMILIES:
            if family.handles(args.command):
                return int(family.run(args))
        raise AssertionError(f"no handler for {args.command}")  # argparse only allows known
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
