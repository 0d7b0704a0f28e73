"""``rapidmq-edge erase --device ID``: remove everything held about one device (gateway
stopped); prints the report as JSON. Exit 0 erased, 1 unknown id or a running gateway,
2 bad configuration or usage."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import ConfigError, load_config
from .common import fail

__all__ = ["handles", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``erase`` to the top-level subparsers."""
    p = sub.add_parser("erase", help="erase everything held about a device / client id "
                                     "(gateway stopped)")
    p.add_argument("--config", type=Path, metavar="FILE", required=True)
    p.add_argument("--device", required=True, metavar="ID", help="the client id")
    p.add_argument("--oscore", action="store_true", help="also remove its OSCORE context")
    p.add_argument("--token", metavar="NAME", help="also remove this HTTP token")
    p.add_argument("--queue", choices=("erase", "report"), default="erase",
                   help="its messages waiting in the forward queue: erase (default) or only "
                        "count them")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help="environment variable holding the identity key's passphrase "
                        "(to sign the receipt)")


def handles(command: str) -> bool:
    """True for ``erase``."""
    return command == "erase"


def run(args: argparse.Namespace) -> int:
    """Execute ``erase``."""
    from ..gateway.datadir import DataDirLocked
    from ..gateway.erasure import UnknownDevice, erase_device

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    passphrase = None
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            return fail(f"{args.passphrase_env} is not set")
        passphrase = value.encode()
    try:
        report = erase_device(config, args.device, oscore=args.oscore, token=args.token,
                              queue=args.queue, passphrase=passphrase)
    except DataDirLocked as exc:
        return fail(f"{exc}: stop the gateway first (nothing was erased)", 1)
    except UnknownDevice as exc:
        return fail(f"unknown device: {exc}", 1)
    except ValueError as exc:
        return fail(str(exc))
    print(json.dumps({"device_sha256": report.device_sha256, "erased": report.erased,
                      "removed": report.removed, "reported": report.reported,
                      "receipt": report.receipt}, indent=2))
    return 0
