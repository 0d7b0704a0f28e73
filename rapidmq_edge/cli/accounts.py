"""``rapidmq-edge user | token | oscore``: the users file, HTTP tokens, OSCORE contexts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ..config import Config, ConfigError, load_config
from .common import ask_secret, fail

__all__ = ["handles", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``user``, ``token`` and ``oscore`` to the top-level subparsers."""
    source = _file_source("auth.users_file", "--users-file", "FILE", "users file to edit")

    user = sub.add_parser("user", help="manage the users file")
    usub = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = usub.add_parser("add", parents=[source], help="add a user or change its password")
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    add.add_argument("--tenant", metavar="TENANT",
                     help='the user\'s tenant ([auth] tenant_source = "user_attribute"); '
                          "kept when omitted")
    remove = usub.add_parser("remove", parents=[source], help="remove a user")
    remove.add_argument("name", metavar="NAME")
    usub.add_parser("list", parents=[source], help="list user names")
    from .rbac import register_user_actions

    register_user_actions(usub)

    tsource = _file_source("http.tokens_file", "--tokens-file", "FILE", "tokens file to edit")
    token = sub.add_parser("token", help="manage the HTTP API tokens file")
    tsub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tadd = tsub.add_parser(
        "add", parents=[tsource], help="create a token (printed once, only its hash is kept)"
    )
    tadd.add_argument("name", metavar="NAME")
    tadd.add_argument("--user", metavar="USER", help="user name the ACL sees (default: NAME)")
    tadd.add_argument("--replace", action="store_true", help="replace an existing token NAME")
    tadd.add_argument("--role", choices=("admin", "read"), default="admin",
                      help="read: the dashboard and subscriptions only, no publishing "
                           "(default: admin)")
    tremove = tsub.add_parser("remove", parents=[tsource], help="remove a token")
    tremove.add_argument("name", metavar="NAME")
    tsub.add_parser("list", parents=[tsource], help="list token names, users and roles")

    osource = _file_source("coap.oscore_dir", "--oscore-dir", "DIR", "contexts directory")
    oscore = sub.add_parser("oscore", help="provision OSCORE security contexts of CoAP devices")
    osub = oscore.add_subparsers(dest="oscore_command", required=True, metavar="ACTION")
    oadd = osub.add_parser(
        "add", parents=[osource],
        help="create a device's context; print the device's side (JSON) once",
    )
    oadd.add_argument("name", metavar="NAME", help="device name = the MQTT user the ACL sees")
    osub.add_parser("list", parents=[osource], help="list provisioned devices")


def handles(command: str) -> bool:
    """True for the commands this module runs."""
    return command in ("user", "token", "oscore")


def run(args: argparse.Namespace) -> int:
    """Execute ``user``, ``token`` or ``oscore``."""
    if args.command == "token":
        return _cmd_token(args)
    if args.command == "oscore":
        return _cmd_oscore(args)
    return _cmd_user(args)


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


def _users_file(args: argparse.Namespace) -> Path:
    return _configured_path(args, args.users_file, "auth.users_file", "--users-file FILE",
                            lambda c: c.auth.users_file)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    return ask_secret("password", "pipe it to --password-stdin", confirm=True)


def _cmd_user(args: argparse.Namespace) -> int:
    from ..security.tenants import valid_tenant
    from ..security.users import UserDB, add_user, remove_user, valid_username
    from .rbac import USER_ACTIONS, run_user

    if args.user_command in USER_ACTIONS:
        return run_user(args)

    try:
        path = _users_file(args)
        if args.user_command == "list":
            for name in UserDB.load(path).names():
                print(name)
            return 0
        if args.user_command == "remove":
            if not remove_user(path, args.name):
                return fail(f"no such user: {args.name}", 1)
            print(f"removed user {args.name} from {path}")
            return 0
        if not valid_username(args.name):
            return fail(f"invalid user name: {args.name!r}")
        password = _read_password(args.password_stdin)
        if not password:
            return fail("empty password refused")
        if args.tenant is not None and not valid_tenant(args.tenant):
            return fail(f"invalid tenant: {args.tenant!r} (one topic level, no / + # $)")
        created = add_user(path, args.name, password, tenant=args.tenant)
    except ConfigError as exc:
        return fail(str(exc))
    except ValueError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or 'users file'}: {exc.strerror or exc}", 1)
    print(f"{'added' if created else 'updated'} user {args.name} in {path}")
    return 0


def _tokens_file(args: argparse.Namespace) -> Path:
    return _configured_path(args, args.tokens_file, "http.tokens_file", "--tokens-file FILE",
                            lambda c: c.http.tokens_file)


def _cmd_token(args: argparse.Namespace) -> int:
    from ..security.tokens import TokenDB, add_token, remove_token

    try:
        path = _tokens_file(args)
        if args.token_command == "list":
            for t in TokenDB.load(path).tokens():
                print(f"{t.name}\t{t.user}\t{t.created}\t{t.role}")
            return 0
        if args.token_command == "remove":
            if not remove_token(path, args.name):
                return fail(f"no such token: {args.name}", 1)
            print(f"removed token {args.name} from {path}")
            return 0
        user = args.user if args.user is not None else args.name
        token = add_token(path, args.name, user, replace=args.replace, role=args.role)
    except ConfigError as exc:
        return fail(str(exc))
    except ValueError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or 'tokens file'}: {exc.strerror or exc}", 1)
    print(f"added token {args.name} (user {user}, role {args.role}) to {path}; it is shown "
          "only this once:",
          file=sys.stderr)
    print(token)
    return 0


def _cmd_oscore(args: argparse.Namespace) -> int:
    import json

    from ..security.oscore import list_devices, provision_device

    try:
        path = _configured_path(args, args.oscore_dir, "coap.oscore_dir", "--oscore-dir DIR",
                                lambda c: c.coap.oscore_dir)
        if args.oscore_command == "list":
            for name in list_devices(path):
                print(name)
            return 0
        device_view = provision_device(path, args.name)
    except ConfigError as exc:
        return fail(str(exc))
    except FileExistsError:
        return fail(f"device {args.name} already has a context in {path}", 1)
    except ValueError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or 'oscore dir'}: {exc.strerror or exc}", 1)
    print(f"added OSCORE context for {args.name} in {path}; a running gateway serves it within "
          "2 s. Install this on the device (shown only this once):", file=sys.stderr)
    print(json.dumps(device_view, indent=2))
    return 0


