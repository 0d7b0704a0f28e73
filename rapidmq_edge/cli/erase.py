"""``rapidmq-edge erase --device ID``: remove everything held about one device; prints the
report as JSON. With the gateway stopped it erases the data directory's files itself; while
the gateway runs it asks it through its HTTP API (``POST /api/v1/erase``) with the admin
token in ``$RAPIDMQ_EDGE_TOKEN`` (``--token-env``). Exit 0 erased, 1 unknown id or refused,
2 bad configuration or usage."""

from __future__ import annotations

import argparse
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from .common import fail

__all__ = ["TOKEN_ENV", "handles", "register", "run"]

#: where the admin token for a running gateway's HTTP API is read from by default
TOKEN_ENV = "RAPIDMQ_EDGE_TOKEN"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``erase`` to the top-level subparsers."""
    p = sub.add_parser("erase", help="erase everything held about a device / client id "
                                     "(a running gateway through its HTTP API)")
    p.add_argument("--config", type=Path, metavar="FILE", required=True)
    p.add_argument("--device", required=True, metavar="ID", help="the client id")
    p.add_argument("--oscore", action="store_true", help="also remove its OSCORE context")
    p.add_argument("--token", metavar="NAME", help="also remove this HTTP token")
    p.add_argument("--queue", choices=("erase", "report"), default="erase",
                   help="its messages waiting in the forward queue: erase (default) or only "
                        "count them")
    p.add_argument("--passphrase-env", metavar="VAR",
                   help="environment variable holding the identity key's passphrase "
                        "(to sign the receipt; gateway stopped)")
    p.add_argument("--token-env", metavar="VAR", default=TOKEN_ENV,
                   help="environment variable holding an admin HTTP token, used when the "
                        f"gateway runs (default: {TOKEN_ENV})")


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
    except DataDirLocked:
        return _erase_running(config, args)
    except UnknownDevice as exc:
        return fail(f"unknown device: {exc}", 1)
    except ValueError as exc:
        return fail(str(exc))
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def _api_url(config: Config) -> str | None:
    """The running gateway's HTTP API base: a bound listener from status.json (port 0
    resolved), else the first configured one (a wildcard host as the loopback)."""
    try:
        status = json.loads((config.gateway.data_dir / "status.json").read_text())
        for url in status.get("listeners", []):
            if isinstance(url, str) and url.startswith(("http://", "https://")):
                scheme, _, rest = url.partition("://")
                host, _, port = rest.rpartition(":")
                host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
                return f"{scheme}://{host}:{port}"
    except (OSError, ValueError, AttributeError):
        pass
    if not config.http.listen:
        return None
    ep = config.http.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(ep.host, ep.host)
    host = f"[{host}]" if ":" in host else host
    return f"{ep.scheme}://{host}:{ep.port}"


def _no_admin_token(config: Config) -> str | None:
    """Why the running gateway cannot be asked (None: an admin token exists)."""
    from ..security.tokens import TokenDB, TokensFileError

    hint = ("create one with `rapidmq-edge token add NAME --role admin` and put it in "
            f"${TOKEN_ENV}, or stop the gateway")
    path = config.http.tokens_file
    if path is None or not path.exists():
        return f"no admin token is configured ([http] tokens_file is not set): {hint}"
    try:
        tokens = TokenDB.load(path).tokens()
    except TokensFileError as exc:
        return f"{exc}: {hint}"
    if not any(t.role == "admin" for t in tokens):
        return f"no admin token is configured in {path}: {hint}"
    return None


def _erase_running(config: Config, args: argparse.Namespace) -> int:
    """Erase through the running gateway's ``POST /api/v1/erase``."""
    base = _api_url(config)
    if base is None:
        return fail("the gateway is running without an HTTP API ([http] listen): stop it to "
                    "erase offline, or enable the API (nothing was erased)", 1)
    why = _no_admin_token(config)
    if why is not None:
        return fail(f"the gateway is running; {why} (nothing was erased)", 1)
    token = os.environ.get(args.token_env)
    if not token:
        return fail(f"the gateway is running: put an admin HTTP token in ${args.token_env} "
                    "to erase through its API (nothing was erased)", 1)
    body: dict[str, Any] = {"device": args.device, "queue": args.queue}
    if args.oscore:
        body["oscore"] = True
    if args.token:
        body["token"] = args.token
    req = urllib.request.Request(
        f"{base}/api/v1/erase", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    ctx = ssl.create_default_context() if base.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=120, context=ctx) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            error = exc.reason
        if exc.code == 404:
            return fail(str(error), 1)
        return fail(f"the gateway refused the erasure ({exc.code}): {error}", 1)
    except (OSError, ValueError) as exc:
        return fail(f"cannot reach the gateway's HTTP API at {base}: {exc} "
                    "(nothing was erased)", 1)
    answer.pop("ok", None)
    print(json.dumps(answer, indent=2))
    return 0
