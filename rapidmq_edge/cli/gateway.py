"""``rapidmq-edge run | check-config | status``: the gateway itself."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..config import ConfigError, load_config
from .common import LOG_FORMAT, fail

__all__ = ["handles", "register", "run"]

log = logging.getLogger("rapidmq_edge")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run``, ``check-config`` and ``status`` to the top-level subparsers."""
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: built-in)")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path, metavar="FILE")

    status = sub.add_parser("status", help="show the running gateway's state")
    status_where = status.add_mutually_exclusive_group()
    status_where.add_argument("--config", type=Path, metavar="FILE", help="take data_dir from it")
    status_where.add_argument("--data-dir", type=Path, metavar="DIR", help="default: ./data")
    status.add_argument("--json", action="store_true", help="print the raw status document")


def handles(command: str) -> bool:
    """True for the commands this module runs."""
    return command in ("run", "check-config", "status")


def run(args: argparse.Namespace) -> int:
    """Execute ``run``, ``check-config`` or ``status``."""
    if args.command == "run":
        return _cmd_run(args.config)
    if args.command == "check-config":
        return _cmd_check(args.file)
    return _cmd_status(args)


def _cmd_run(config_path: Path | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return fail(str(exc))
    logging.basicConfig(level=config.gateway.log_level.upper(), format=LOG_FORMAT)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    from ..crypto.errors import CryptoError
    from ..gateway import run_gateway  # the whole gateway: only imported to run it

    try:
        return int(run_gateway(config))
    except CryptoError as exc:  # [security] keys missing, wrong passphrase, ...
        return fail(f"post-quantum protection: {exc}", 1)


def _cmd_check(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return fail(str(exc))
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("ok")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from ..ops.status import STATUS_FILE, render

    data_dir: Path = args.data_dir or Path("./data")
    if args.config is not None:
        try:
            data_dir = load_config(args.config).gateway.data_dir
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    path = data_dir / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: no gateway status at {path} ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=1, sort_keys=True) if args.json else render(data))
    return 0


