"""Password hashing (scrypt) and the TOML users file.

File format::

    [users.alice]
    password = "$scrypt$ln=14,r=8,p=1$<base64 salt>$<base64 hash>"
    tenant = "acme"        # optional: the tenant ([auth] tenant_source = "user_attribute")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.files import named_tables, read_toml, write_toml_atomic

__all__ = [
    "UsersFileError",
    "UserDB",
    "hash_password",
    "verify_password",
    "valid_username",
    "add_user",
    "remove_user",
]

_LN, _R, _P = 14, 8, 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_MAX_SCRYPT_MEM = 256 * 1024 * 1024
_CACHE_SIZE = 4096


class UsersFileError(ConfigError):
    """The users file is missing, unreadable or malformed; the message names the file."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(pw: str) -> str:
    """Hash ``pw`` with a fresh salt: ``$scrypt$ln=14,r=8,p=1$<salt>$<hash>``."""
    salt = os.urandom(_SALT_BYTES)
    dk = hashlib.scrypt(pw.encode(), salt=salt, n=1 << _LN, r=_R, p=_P, dklen=_HASH_BYTES)
    return f"$scrypt$ln={_LN},r={_R},p={_P}${_b64(salt)}${_b64(dk)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(ln, r, p, salt, hash) of a well-formed, sanely-sized encoding; None otherwise."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return None
    try:
        params = dict(kv.split("=", 1) for kv in parts[2].split(","))
        ln, r, p = int(params.pop("ln")), int(params.pop("r")), int(params.pop("p"))
        salt, dk = _unb64(parts[3]), _unb64(parts[4])
    except (KeyError, ValueError, binascii.Error):
        return None
    if params or not (1 <= ln <= 24 and 1 <= r <= 64 and 1 <= p <= 16):
        return None
    if 128 * r * ((1 << ln) + p) > _MAX_SCRYPT_MEM or not salt or not 16 <= len(dk) <= 64:
        return None
    return ln, r, p, salt, dk


def _verify(pw: bytes, encoded: str) -> bool:
    parsed = _parse(encoded)
    if parsed is None:
        return False
    ln, r, p, salt, dk = parsed
    n = 1 << ln
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    try:
        got = hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, dklen=len(dk), maxmem=maxmem)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, dk)


def verify_password(pw: str | bytes, encoded: str) -> bool:
    """True when ``pw`` matches ``encoded``; unknown or malformed encodings give False."""
    return _verify(pw.encode() if isinstance(pw, str) else pw, encoded)


def valid_username(name: str) -> bool:
    """Names are 1-256 characters without control characters."""
    return 0 < len(name) <= 256 and all(c.isprintable() or c == " " for c in name)


_dummy_hash: str | None = None


def _dummy() -> str:
    """A real hash to verify against for unknown users (equalises timing)."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_hex(16))
    return _dummy_hash


def _read_users(path: Path) -> dict[str, Any]:
    """Decoded TOML of the users file (raises UsersFileError)."""
    return read_toml(path, "users file", UsersFileError)


def _validate(path: Path, data: dict[str, Any]) -> dict[str, str]:
    """name -> encoded hash, checking the whole document."""
    out: dict[str, str] = {}
    for name, key, entry in named_tables(path, data, "users", UsersFileError, valid_username,
                                         "invalid user name", ("password", "tenant"),
                                         "must be a table with a password key"):
        if not isinstance(entry.get("tenant", ""), str):
            raise UsersFileError(f"{path}: {key}.tenant: must be a string")
        pw = entry.get("password")
        if not isinstance(pw, str) or _parse(pw) is None:
            raise UsersFileError(
                f'{path}: {key}.password: must be a "$scrypt$ln=..,r=..,p=..$salt$hash" string '
                "(create it with: rapidmq-edge user add)"
            )
        out[name] = pw
    return out


def _tenants(data: dict[str, Any]) -> dict[str, str]:
    """name -> tenant of the (validated) entries that have one."""
    users = data.get("users", {})
    return {n: e["tenant"] for n, e in users.items() if isinstance(e.get("tenant"), str)}


def _dump(path: Path, users: dict[str, str], tenants: dict[str, str]) -> None:
    table: dict[str, dict[str, str]] = {}
    for n, h in sorted(users.items()):
        table[n] = {"password": h}
        if n in tenants:
            table[n]["tenant"] = tenants[n]
    write_toml_atomic(path, {"users": table})


class UserDB:
    """In-memory users table with a cache of recent successful logins."""

    def __init__(self, users: dict[str, str] | None = None,
                 tenants: dict[str, str] | None = None) -> None:
        self._users: dict[str, str] = dict(users or {})
        #: name -> tenant (the users file's optional ``tenant`` attribute)
        self.tenants: dict[str, str] = dict(tenants or {})
        self._cache_key = secrets.token_bytes(32)
        self._ok: OrderedDict[bytes, None] = OrderedDict()

    @classmethod
    def load(cls, path: Path) -> UserDB:
        """Read and validate a users file (raises UsersFileError)."""
        data = _read_users(path)
        return cls(_validate(path, data), _tenants(data))

    def names(self) -> list[str]:
        """Sorted user names."""
        return sorted(self._users)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __len__(self) -> int:
        return len(self._users)

    def _cache_id(self, username: str, password: bytes) -> bytes:
        user = username.encode()
        msg = len(user).to_bytes(4, "big") + user + password
        return hmac.new(self._cache_key, msg, hashlib.sha256).digest()

    def cached(self, username: str, password: bytes | None) -> bool:
        """True when this exact login recently succeeded (no hashing needed)."""
        if password is None:
            return False
        cid = self._cache_id(username, password)
        if cid in self._ok:
            self._ok.move_to_end(cid)
            return True
        return False

    def authenticate(self, username: str, password: bytes | None) -> bool:
        """Check a login; CPU-heavy (~50 ms) unless the same login succeeded recently."""
        if password is None:
            return False
        if self.cached(username, password):
            return True
        encoded = self._users.get(username)
        ok = _verify(password, encoded or _dummy()) and encoded is not None
        if ok:
            self._ok[self._cache_id(username, password)] = None
            if len(self._ok) > _CACHE_SIZE:
                self._ok.popitem(last=False)
        return ok

    async def authenticate_async(self, username: str, password: bytes | None) -> bool:
        """Like authenticate(), but runs a cache miss in a worker thread."""
        if password is None:
            return False
        if self.cached(username, password):
            return True
        return await asyncio.to_thread(self.authenticate, username, password)


def add_user(path: Path, name: str, password: str, tenant: str | None = None) -> bool:
    """Add or replace ``name`` (with a ``tenant`` attribute when given; else an existing one
    is kept); creates the file if needed. True when the user is new."""
    if not valid_username(name):
        raise ValueError(f"invalid user name: {name!r}")
    if not password:
        raise ValueError("empty password")
    data = _read_users(path) if path.exists() else {}
    users = _validate(path, data) if data else {}
    tenants = _tenants(data)
    created = name not in users
    users[name] = hash_password(password)
    if tenant is not None:
        tenants[name] = tenant
    _dump(path, users, tenants)
    return created


def remove_user(path: Path, name: str) -> bool:
    """Remove ``name``; False when there was no such user."""
    data = _read_users(path)
    users = _validate(path, data)
    if users.pop(name, None) is None:
        return False
    _dump(path, users, _tenants(data))
    return True
