"""``rapidmq-edge run | check-config | status``: the gateway itself."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, ConfigErrors, load_config
from .common import fail, setup_logging

__all__ = ["handles", "register", "run"]

log = logging.getLogger("rapidmq_edge")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``run``, ``check-config`` and ``status`` to the top-level subparsers."""
    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: built-in)")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path, metavar="FILE")

    status = sub.add_parser(
        "status", help="show the gateway's state (exit 0 running, 1 stale, 3 not running)")
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


def _problems(exc: ConfigError) -> list[str]:
    return [str(p) for p in exc.problems] if isinstance(exc, ConfigErrors) else [str(exc)]


def _fail_all(problems: list[str]) -> int:
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 2


def _cmd_run(config_path: Path | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail_all(_problems(exc))
    setup_logging(config.log)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    from ..gateway.preflight import preflight

    checked = preflight(config)
    for warning in checked.warnings:
        log.warning("config: %s", warning)
    if checked.problems:
        for problem in checked.problems:
            log.error("config: %s", problem)
        return _fail_all(checked.problems)
    from ..crypto.errors import CryptoError
    from ..gateway import run_gateway  # the whole gateway: only imported to run it

    try:
        return int(run_gateway(config))
    except CryptoError as exc:  # [security] keys missing, wrong passphrase, ...
        return fail(f"post-quantum protection: {exc}", 1)


def _cmd_check(path: Path) -> int:
    """Validate the file and load everything it names; report every problem found."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _fail_all(_problems(exc))
    from ..gateway.preflight import preflight

    checked = preflight(config)
    for warning in [*config.warnings, *checked.warnings]:
        print(f"warning: {warning}", file=sys.stderr)
    if checked.problems:
        return _fail_all(checked.problems)
    print("ok")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Running or not (from the data directory's lock), and the last status it wrote.
    Exit 0 running, 1 running but its status is stale or unreadable, 3 not running."""
    from ..ops.status import STATUS_FILE, assess, lock_holder, render

    data_dir: Path = args.data_dir or Path("./data")
    if args.config is not None:
        try:
            data_dir = load_config(args.config).gateway.data_dir
        except ConfigError as exc:
            return fail(str(exc))
    path = data_dir / STATUS_FILE
    data: dict[str, Any] | None = None
    problem = ""
    for _ in range(3):  # a status rewritten in place on a full disk may be read half-done
        try:
            data = json.loads(path.read_text())
            break
        except FileNotFoundError:
            problem = f"no status file at {path}"
            break
        except (OSError, ValueError) as exc:
            problem = f"unreadable status file {path} ({exc})"
            time.sleep(0.2)
    live = assess(lock_holder(data_dir), data, time.time())
    if args.json:
        print(json.dumps({**(data or {}), "check": {
            "state": live.state, "pid": live.pid, "age_s": live.age, "why": live.why,
            "data_dir": str(data_dir)}}, indent=1, sort_keys=True, default=str))
    elif data is not None:
        print(render(data, live=live))
    else:
        print(f"gateway: {live.state.upper()}" + (f" (pid {live.pid})" if live.pid else "")
              + f": {problem}")
    return live.exit_code
