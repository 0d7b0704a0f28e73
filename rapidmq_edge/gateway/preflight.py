"""Everything the configuration names, loaded as the gateway will load it: ``check-config``
says "ok" only when ``run`` will start, and both report every problem, one line each,
starting with the key at fault.

Checked: the data directory is writable; the users file, tokens file and OSCORE contexts
load; the TLS certificates and keys of the listeners and upstreams load; the post-quantum
keys a protected ``[[forward]]`` rule needs are there (and a passphrase for an encrypted
one); the ``[ota] trust`` files hold operator public keys. A missing tokens file or OSCORE
directory is a warning (the gateway runs without).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError
from ..security.tokens import TokenDB
from ..security.users import UserDB

__all__ = ["Preflight", "preflight"]

#: the environment variable the protection reads a key passphrase from
PASSPHRASE_ENV = "RAPIDMQ_KEY_PASSPHRASE"


@dataclass(slots=True)
class Preflight:
    """Problems (the gateway would not start) and warnings (it would, but look)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preflight(config: Config) -> Preflight:
    """Load every file ``config`` names; collect what is wrong."""
    out = Preflight()
    _data_dir(config.gateway.data_dir, out)
    users = config.auth.users_file
    if users is not None:
        _load("auth.users_file", lambda: UserDB.load(users), out)
        if not users.exists():
            out.problems[-1] += f" (create it: rapidmq-edge user add --users-file {users} NAME)"
    tokens = config.http.tokens_file
    if tokens is not None:
        if tokens.exists() or tokens.is_symlink():
            _load("http.tokens_file", lambda: TokenDB.load(tokens), out)
        elif config.http.listen:
            out.warnings.append(f"http.tokens_file: {tokens} does not exist (yet): only "
                                "/api/v1/health answers until `rapidmq-edge token add`")
    _oscore(config, out)
    _tls(config, out)
    _keys(config, out)
    _ota_trust(config, out)
    return out


def _load(key: str, load: object, out: Preflight) -> None:
    try:
        load()  # type: ignore[operator]
    except ConfigError as exc:
        out.problems.append(f"{key}: {exc}")
    except OSError as exc:
        out.problems.append(f"{key}: {exc.filename or ''}: {exc.strerror or exc}")


def _ota_trust(config: Config, out: Preflight) -> None:
    """Each ``[ota] trust`` file holds an operator public key (docs/ota.md)."""
    if not config.ota.trust:
        return  # nothing to check: COSE / cbor2 stay unimported
    from ..crypto.errors import MalformedError
    from ..ota.operator_keys import parse_public_key

    for i, path in enumerate(config.ota.trust):
        try:
            parse_public_key(path.read_bytes())
        except OSError as exc:
            out.problems.append(f"ota.trust[{i}]: {path}: {exc.strerror or exc}")
        except MalformedError as exc:
            out.problems.append(f"ota.trust[{i}]: {path}: not an operator public key: {exc}")


def _data_dir(data_dir: Path, out: Preflight) -> None:
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        out.problems.append(f"gateway.data_dir: {existing} is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        out.problems.append(f"gateway.data_dir: {existing} is not writable")


def _oscore(config: Config, out: Preflight) -> None:
    oscore = config.coap.oscore_dir
    if oscore is None or not config.coap.listen:
        return
    if not oscore.is_dir():
        out.warnings.append(f"coap.oscore_dir: {oscore} does not exist: no OSCORE devices")
        return
    try:
        from ..security.oscore import context_problems
    except ImportError:  # pragma: no cover - aiocoap is a dependency
        return
    out.problems += [f"coap.oscore_dir: {p}" for p in context_problems(oscore)]


def _server_tls(key: str, cert: Path, keyfile: Path, ca: Path | None, out: Preflight) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(keyfile))
        if ca is not None:
            ctx.load_verify_locations(str(ca))
    except (ssl.SSLError, OSError) as exc:
        out.problems.append(f"{key}: cannot load {cert} / {keyfile}"
                            + (f" / {ca}" if ca else "") + f": {exc}")


def _tls(config: Config, out: Preflight) -> None:
    m = config.mqtt
    if m.tls is not None and any(li.is_tls for li in m.listen):
        _server_tls("mqtt.tls", m.tls.cert, m.tls.key, m.tls.client_ca, out)
    h = config.http
    if h.tls is not None and any(ep.scheme == "https" for ep in h.listen):
        _server_tls("http.tls", h.tls.cert, h.tls.key, h.tls.client_ca, out)
    for i, up in enumerate(config.forwarding.upstreams):
        try:
            up.client_tls()
        except (ssl.SSLError, OSError) as exc:
            out.problems.append(f"upstream[{i}]: cannot load its TLS files: {exc}")


def _keys(config: Config, out: Preflight) -> None:
    fw = config.forwarding
    rules = [r for r in fw.forward if r.encrypt or r.sign]
    if not rules:
        return
    from ..crypto.errors import CryptoError
    from ..crypto.keystore import KeyStore

    sec = fw.security
    keys_dir = sec.keys_dir or config.gateway.data_dir / "keys"
    store = KeyStore(keys_dir)
    if any(r.sign for r in rules):
        try:
            info = store.active("identity")
            if store.is_encrypted(info) and sec.passphrase_file is None \
                    and not os.environ.get(PASSPHRASE_ENV):
                out.problems.append(
                    f"security.keys_dir: the gateway identity in {keys_dir} is "
                    f"passphrase-protected: set security.passphrase_file or {PASSPHRASE_ENV}")
        except (CryptoError, OSError) as exc:
            out.problems.append(f"security.keys_dir: {exc}")
    if any(r.encrypt for r in rules):
        try:
            store.recipient_public()
        except (CryptoError, OSError) as exc:
            out.problems.append(f"security.keys_dir: {exc}")
