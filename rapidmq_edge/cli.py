"""Command line: ``rapidmq-edge run | check-config | status | user | token | oscore ...``.

Exit codes: 0 success, 1 runtime failure (e.g. unknown user), 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rapidmq_edge import __version__, cli_cloud, cli_crypto
from rapidmq_edge.config import Config, ConfigError, load_config

__all__ = ["main", "build_parser"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("rapidmq_edge")


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="rapidmq-edge", description="RapidMQ Edge IoT gateway and MQTT broker."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway")
    run.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: built-in)")

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path, metavar="FILE")

    status = sub.add_parser("status", help="show the running gateway's state")
    status_where = status.add_mutually_exclusive_group()
    status_where.add_argument("--config", type=Path, metavar="FILE", help="take data_dir from it")
    status_where.add_argument("--data-dir", type=Path, metavar="DIR", help="default: ./data")
    status.add_argument("--json", action="store_true", help="print the raw status document")

    source = _file_source("auth.users_file", "--users-file", "FILE", "users file to edit")

    user = sub.add_parser("user", help="manage the users file")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = usub.add_parser("add", parents=[source], help="add a user or change its password")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    remove = usub.add_parser("remove", parents=[source], help="remove a user")
    remove.add_argument("name", metavar="NAME")
    usub.add_parser("list", parents=[source], help="list user names")

    tsource = _file_source("http.tokens_file", "--tokens-file", "FILE", "tokens file to edit")
    token = sub.add_parser("token", help="manage the HTTP API tokens file")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tadd = tsub.add_parser(
        "add", parents=[tsource], help="create a token (printed once, only its hash is kept)"
    )
    tadd.add_argument("name", metavar="NAME")
    tadd.add_argument("--user", metavar="USER", help="user name the ACL sees (default: NAME)")
    tadd.add_argument("--replace", action="store_true", help="replace an existing token NAME")
    tremove = tsub.add_parser("remove", parents=[tsource], help="remove a token")
    tremove.add_argument("name", metavar="NAME")
    tsub.add_parser("list", parents=[tsource], help="list token names and their users")

    osource = _file_source("coap.oscore_dir", "--oscore-dir", "DIR", "contexts directory")
    oscore = sub.add_parser("oscore", help="provision OSCORE security contexts of CoAP devices")
    osub = oscore.add_subparsers(dest="oscore_command", required=True, metavar="ACTION")
    oadd = osub.add_parser(
        "add", parents=[osource],
        help="create a device's context; print the device's side (JSON) once",
    )
    oadd.add_argument("name", metavar="NAME", help="device name = the MQTT user the ACL sees")
    osub.add_parser("list", parents=[osource], help="list provisioned devices")
    cli_crypto.register(sub)
    cli_cloud.register(sub)
    return parser


def _file_source(key: str, flag: str, metavar: str, help: str) -> argparse.ArgumentParser:
    """Parent parser: ``--config FILE`` (take ``key`` from it) or ``flag`` given directly."""
    source = argparse.ArgumentParser(add_help=False)
    where = source.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, metavar="FILE", help=f"take {key} from it")
    where.add_argument(flag, type=Path, metavar=metavar, help=help)
    return source


def _configured_path(args: argparse.Namespace, explicit: Path | None, key: str,
                     flag: str, get: Callable[[Config], Path | None]) -> Path:
    """``explicit`` if given, else ``key`` of ``--config`` (a clear error when unset)."""
    if explicit is not None:
        return Path(explicit)
    path = get(load_config(args.config))
    if path is None:
        where = f"in {args.config}" if args.config else "(no --config given)"
        raise ConfigError(f"{key}: not set {where}; pass {flag}")
    return path


def _cmd_run(config_path: Path | None) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(str(exc))
    logging.basicConfig(level=config.gateway.log_level.upper(), format=LOG_FORMAT)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        from rapidmq_edge.app import run_gateway
    except ModuleNotFoundError as exc:
        if exc.name != "rapidmq_edge.app":
            raise
        return _fail("gateway runtime (rapidmq_edge.app) is not available", 1)
    from rapidmq_edge.crypto.errors import CryptoError

    try:
        return int(run_gateway(config))
    except CryptoError as exc:  # [security] keys missing, wrong passphrase, ...
        return _fail(f"post-quantum protection: {exc}", 1)


def _cmd_check(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _fail(str(exc))
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print("ok")
    return 0


def _users_file(args: argparse.Namespace) -> Path:
    return _configured_path(args, args.users_file, "auth.users_file", "--users-file FILE",
                            lambda c: c.auth.users_file)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    first = getpass.getpass("Password: ")
    if first and getpass.getpass("Repeat password: ") != first:
        raise ValueError("passwords do not match")
    return first


def _cmd_user(args: argparse.Namespace) -> int:
    from rapidmq_edge.security.users import UserDB, add_user, remove_user, valid_username

    try:
        path = _users_file(args)
        if args.user_command == "list":
            for name in UserDB.load(path).names():
                print(name)
            return 0
        if args.user_command == "remove":
            if not remove_user(path, args.name):
                return _fail(f"no such user: {args.name}", 1)
            print(f"removed user {args.name} from {path}")
            return 0
        if not valid_username(args.name):
            return _fail(f"invalid user name: {args.name!r}")
        password = _read_password(args.password_stdin)
        if not password:
            return _fail("empty password refused")
        created = add_user(path, args.name, password)
    except ConfigError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or 'users file'}: {exc.strerror or exc}", 1)
    print(f"{'added' if created else 'updated'} user {args.name} in {path}")
    return 0


def _tokens_file(args: argparse.Namespace) -> Path:
    return _configured_path(args, args.tokens_file, "http.tokens_file", "--tokens-file FILE",
                            lambda c: c.http.tokens_file)


def _cmd_token(args: argparse.Namespace) -> int:
    from rapidmq_edge.security.tokens import TokenDB, add_token, remove_token

    try:
        path = _tokens_file(args)
        if args.token_command == "list":
            for t in TokenDB.load(path).tokens():
                print(f"{t.name}\t{t.user}\t{t.created}")
            return 0
        if args.token_command == "remove":
            if not remove_token(path, args.name):
                return _fail(f"no such token: {args.name}", 1)
            print(f"removed token {args.name} from {path}")
            return 0
        user = args.user if args.user is not None else args.name
        token = add_token(path, args.name, user, replace=args.replace)
    except ConfigError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or 'tokens file'}: {exc.strerror or exc}", 1)
    print(f"added token {args.name} (user {user}) to {path}; it is shown only this once:",
          file=sys.stderr)
    print(token)
    return 0


def _cmd_oscore(args: argparse.Namespace) -> int:
    import json

    from rapidmq_edge.security.oscore import list_devices, provision_device

    try:
        path = _configured_path(args, args.oscore_dir, "coap.oscore_dir", "--oscore-dir DIR",
                                lambda c: c.coap.oscore_dir)
        if args.oscore_command == "list":
            for name in list_devices(path):
                print(name)
            return 0
        device_view = provision_device(path, args.name)
    except ConfigError as exc:
        return _fail(str(exc))
    except FileExistsError:
        return _fail(f"device {args.name} already has a context in {path}", 1)
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or 'oscore dir'}: {exc.strerror or exc}", 1)
    print(f"added OSCORE context for {args.name} in {path}; restart the gateway to load it. "
          "Install this on the device (shown only this once):", file=sys.stderr)
    print(json.dumps(device_view, indent=2))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .ops.status import STATUS_FILE, render

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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args.config)
        if args.command == "check-config":
            return _cmd_check(args.file)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "token":
            return _cmd_token(args)
        if args.command == "oscore":
            return _cmd_oscore(args)
        if cli_crypto.handles(args.command):
            return cli_crypto.run(args)
        if cli_cloud.handles(args.command):
            return cli_cloud.run(args)
        return _cmd_user(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
