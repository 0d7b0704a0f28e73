"""Command line for keys and the audit chain: ``rapidmq-edge keys ...`` / ``audit ...``.

``register(sub)`` adds the subcommands to the main parser; ``run(args)`` executes them (returns
an exit code: 0 ok, 1 failure such as a broken chain or wrong passphrase, 2 usage/config error).
Keys live in ``<data_dir>/keys``; a gateway's batch chain in ``<data_dir>/forward.db`` (a standalone
one, :class:`~rapidmq_edge.crypto.batchlog.BatchLog`'s, in ``<data_dir>/audit/chain.sqlite``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .common import ask_secret

__all__ = ["CHAIN_FILE", "KEYS_DIR", "handles", "register", "run"]

KEYS_DIR = "keys"
CHAIN_FILE = Path("audit") / "chain.sqlite"
PASSPHRASE_ENV = "RAPIDMQ_KEY_PASSPHRASE"


def _where(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", type=Path, metavar="FILE", help="take gateway.data_dir from it")
    g.add_argument("--data-dir", type=Path, metavar="DIR", help="default: ./data")
    p.add_argument("--keys-dir", type=Path, metavar="DIR", help="default: DATA_DIR/keys")


def _passphrase_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passphrase-file", type=Path, metavar="FILE", help="first line = passphrase")
    g.add_argument("--ask-passphrase", action="store_true", help="prompt for the passphrase")
    # else: $RAPIDMQ_KEY_PASSPHRASE if set, else no passphrase (plain key files, mode 0600)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``keys`` and ``audit`` to the top-level subparsers."""
    keys = sub.add_parser("keys", help="post-quantum keys (gateway identity, cloud recipient)")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = ks.add_parser("init", help="create the gateway identity (and/or a recipient key)")
    _where(init)
    _passphrase_args(init)
    init.add_argument("--recipient", action="store_true", help="also create a cloud recipient key")
    init.add_argument("--no-identity", action="store_true", help="do not create a gateway identity")
    show = ks.add_parser("show", help="list keys, kids, state and file modes")
    _where(show)
    rot = ks.add_parser("rotate", help="new active key; the old one stays for older data")
    _where(rot)
    _passphrase_args(rot)
    rot.add_argument("kind", choices=["identity", "recipient"])
    exp = ks.add_parser("export-public", help="write a public key (COSE_Key AKP, raw or PEM)")
    _where(exp)
    exp.add_argument("kind", choices=["identity", "recipient"])
    exp.add_argument("--kid", metavar="HEX", help="key id (prefix); default: the active key")
    exp.add_argument("--format", choices=["cose", "raw", "pem"], default="cose")
    exp.add_argument("--out", type=Path, metavar="FILE", help="default: hex on stdout")
    imp = ks.add_parser("import-recipient", help="store the cloud's recipient public key")
    _where(imp)
    imp.add_argument("file", type=Path, metavar="FILE", help="COSE_Key from export-public")

    audit = sub.add_parser("audit", help="verify the signed batch chain")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    ver = asub.add_parser("verify", help="verify a whole chain; name the first broken link")
    _where(ver)
    ver.add_argument(
        "--chain", type=Path, metavar="FILE",
        help="default: the gateway's, in DATA_DIR/forward.db (else DATA_DIR/audit/chain.sqlite)")
    ver.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="FILE",
        help="identity COSE_Key(s) to trust (default: all identity keys in the keys dir)",
    )
    ver.add_argument("--gateway-id", metavar="ID", help="require this gateway id")
    ver.add_argument("--db", metavar="URL|FILE",
                     help="the chain the cloud consumers stored (postgresql://... or the "
                          "cloud .sqlite / .state.sqlite file); needs --gateway-id")


def handles(command: str) -> bool:
    """True for the commands this module implements."""
    return command in ("keys", "audit")


def _data_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "data_dir", None) is not None:
        return Path(args.data_dir)
    if getattr(args, "config", None) is not None:
        from ..config import load_config

        return Path(load_config(args.config).gateway.data_dir)
    return Path("./data")


def _default_chain(data_dir: Path) -> Path:
    """The gateway's chain: ``forward.db`` once a rule signed (the chain is kept there, in the
    queue's transactions); else a standalone ``audit/chain.sqlite``."""
    import sqlite3

    fwd = data_dir / "forward.db"
    if fwd.exists():
        db = sqlite3.connect(f"file:{fwd}?mode=ro", uri=True)
        try:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'batches'").fetchone():
                return fwd
        finally:
            db.close()
    return data_dir / CHAIN_FILE


def _keys_dir(args: argparse.Namespace) -> Path:
    return Path(args.keys_dir) if args.keys_dir is not None else _data_dir(args) / KEYS_DIR


def _passphrase(args: argparse.Namespace, confirm: bool = False) -> bytes | None:
    if getattr(args, "passphrase_file", None) is not None:
        line = Path(args.passphrase_file).read_text().splitlines()
        return line[0].encode() if line and line[0] else None
    if getattr(args, "ask_passphrase", False):
        first = ask_secret("key passphrase", "give --passphrase-file FILE or set "
                           f"{PASSPHRASE_ENV}", confirm=confirm)
        return first.encode() or None
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _cmd_keys(args: argparse.Namespace) -> int:
    from ..crypto.keystore import KeyStore

    store = KeyStore(_keys_dir(args))
    cmd = args.keys_command
    if cmd == "init":
        pw = _passphrase(args, confirm=True)
        made = []
        if not args.no_identity:
            if store.keys("identity"):
                print(f"identity exists ({store.active('identity').kid.hex()}); use `keys rotate`")
            else:
                made.append(store.create_identity(pw))
        if args.recipient:
            if store.keys("recipient"):
                print(f"recipient exists ({store.active('recipient').kid.hex()})")
            else:
                made.append(store.create_recipient(pw))
        for info in made:
            enc = " (passphrase-encrypted)" if pw else ""
            print(f"created {info.kind} key {info.kid.hex()} in {store.directory}{enc}")
        return 0
    if cmd == "show":
        any_key = False
        for kind in ("identity", "recipient", "recipient-public"):
            for info in store.keys(kind):  # type: ignore[arg-type]
                any_key = True
                state = "active" if info.active else f"retired {_fmt_time(info.retired)}"
                if info.file:
                    path = store.directory / info.file
                    mode = oct(path.stat().st_mode & 0o777) if path.exists() else "missing"
                    enc = "encrypted" if store.is_encrypted(info) else "plain"
                    where = f"{info.file} {mode} {enc}"
                else:
                    where = info.public
                created = _fmt_time(info.created)
                print(f"{kind:17} {info.kid.hex()}  {state:28} created {created}  {where}")
        if not any_key:
            print(f"no keys in {store.directory} (run `rapidmq-edge keys init`)")
        return 0
    if cmd == "rotate":
        pw = _passphrase(args, confirm=True)
        old = store.active(args.kind).kid.hex() if store.keys(args.kind) else None
        info = store.create_identity(pw) if args.kind == "identity" else store.create_recipient(pw)
        print(
            f"rotated {args.kind}: active {info.kid.hex()}"
            + (f", kept {old} (retired)" if old else "")
        )
        return 0
    if cmd == "export-public":
        return _export(store, args)
    if cmd == "import-recipient":
        info = store.import_recipient_public(Path(args.file).read_bytes())
        print(f"imported recipient public key {info.kid.hex()}; the gateway now seals to it")
        return 0
    raise AssertionError(cmd)


def _export(store: object, args: argparse.Namespace) -> int:
    from ..crypto.keys import IdentityPublicKey, RecipientPublicKey
    from ..crypto.keystore import KeyStore

    assert isinstance(store, KeyStore)
    data = store.public_cose(args.kind, args.kid)
    key = (
        IdentityPublicKey.from_cose(data)
        if args.kind == "identity"
        else RecipientPublicKey.from_cose(data)
    )
    if args.format == "raw":
        data = key.public_key
    elif args.format == "pem":
        if args.kind != "identity":
            raise ValueError("PEM (SPKI) export exists only for the ML-DSA-65 identity")
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric import mldsa

        data = mldsa.MLDSA65PublicKey.from_public_bytes(key.public_key).public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
        )
    if args.out is not None:
        Path(args.out).write_bytes(data)
        print(
            f"wrote {args.kind} public key {key.kid.hex()} ({args.format}, {len(data)} B) "
            f"to {args.out}"
        )
    else:
        print(data.decode() if args.format == "pem" else data.hex())
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..crypto.batch import verify_chain
    from ..crypto.batchlog import read_chain
    from ..crypto.keys import IdentityPublicKey, VerifierKeyring
    from ..crypto.keystore import KeyStore

    chain = Path(args.chain) if args.chain is not None else _default_chain(_data_dir(args))
    if args.public_key:
        ring = VerifierKeyring(
            IdentityPublicKey.from_cose(Path(p).read_bytes()) for p in args.public_key
        )
    else:
        ring = KeyStore(_keys_dir(args)).verifier_keyring()
    if not len(ring):
        print("error: no identity public keys to verify with (--public-key FILE)", file=sys.stderr)
        return 2
    if args.db is not None:
        from ..cloud.audit import stored_chain

        if not args.gateway_id:
            print("error: --db needs --gateway-id", file=sys.stderr)
            return 2
        entries, start, prev = stored_chain(args.db, args.gateway_id)
        report = verify_chain(entries, ring, gateway_id=args.gateway_id, start_seq=start,
                              start_prev_root=prev)
    else:
        report = verify_chain(read_chain(chain), ring, gateway_id=args.gateway_id)
    if report.broken is None:
        head = report.head
        tail = f", head seq {head.seq} root {head.root.hex()}" if head else " (empty chain)"
        print(f"ok: {report.batches} batches, {report.messages} messages verified{tail}")
        return 0
    b = report.broken
    seq = f" (seq {b.seq})" if b.seq is not None else ""
    print(f"BROKEN at batch #{b.position}{seq}: {b.reason}: {b.detail}")
    print(f"{report.batches} batches before it verified")
    return 1


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``keys`` / ``audit`` command."""
    from ..config import ConfigError
    from ..crypto.errors import CryptoError

    try:
        return _cmd_keys(args) if args.command == "keys" else _cmd_audit(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CryptoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
