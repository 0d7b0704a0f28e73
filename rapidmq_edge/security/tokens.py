"""Bearer tokens of the HTTP API: a TOML file of named tokens, each acting as one user.

File format (written by ``rapidmq-edge token add``; mode 0600, replaced atomically)::

    [tokens.dashboard]
    user = "alice"                        # the user name the ACL sees
    hash = "sha256:<64 hex digits>"       # SHA-256 of the token; the token itself is not kept
    created = "2024-05-01T12:00:00Z"      # informational
    role = "read"                         # optional: "admin" (the default) or "read"

A ``read`` token may look (the dashboard, ``/api/v1/subscribe``) but not publish; an
``admin`` token may do everything the ACL lets its user do. Tokens written before roles
existed have no ``role`` key and stay ``admin``.

A token is ``rmq_`` followed by 32 random bytes (URL-safe base64), so a single unsalted
SHA-256 is enough: there is nothing to brute-force. Lookups compare the presented token's
digest with every stored digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..config.files import named_tables, read_toml, write_toml_atomic
from .users import valid_username

__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "Token",
    "TokenDB",
    "TokensFileError",
    "add_token",
    "generate_token",
    "hash_token",
    "remove_token",
    "valid_token_name",
]

TOKEN_PREFIX = "rmq_"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_TOKEN_LEN = 512
#: what a token may do: look only, or everything its user's ACL allows
ROLES = ("admin", "read")


class TokensFileError(ConfigError):
    """The tokens file is missing, unreadable or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class Token:
    """One named token (its hash only)."""

    name: str
    user: str
    hash: str
    created: str = ""
    role: str = "admin"

    @property
    def may_publish(self) -> bool:
        """False for a read-only token."""
        return self.role == "admin"


def valid_token_name(name: str) -> bool:
    """Names are 1-64 characters of ``A-Z a-z 0-9 . _ -``."""
    return _NAME_RE.fullmatch(name) is not None


def generate_token() -> str:
    """A fresh high-entropy token: ``rmq_`` + 43 URL-safe characters (32 random bytes)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of the token's UTF-8 bytes."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, "tokens file", TokensFileError)


def _validate(path: Path, data: dict[str, Any]) -> dict[str, Token]:
    out: dict[str, Token] = {}
    for name, key, entry in named_tables(path, data, "tokens", TokensFileError, valid_token_name,
                                         "invalid token name (use A-Z a-z 0-9 . _ -)",
                                         ("user", "hash", "created", "role"),
                                         "must be a table with user and hash keys"):
        user = entry.get("user")
        if not isinstance(user, str) or not valid_username(user):
            raise TokensFileError(f"{path}: {key}.user: must be a user name")
        digest = entry.get("hash")
        if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
            raise TokensFileError(
                f'{path}: {key}.hash: must be a "sha256:<64 hex digits>" string '
                "(create tokens with: rapidmq-edge token add)"
            )
        created = entry.get("created", "")
        if not isinstance(created, str):
            raise TokensFileError(f"{path}: {key}.created: must be a string")
        role = entry.get("role", "admin")
        if role not in ROLES:
            raise TokensFileError(f'{path}: {key}.role: must be "admin" or "read"')
        out[name] = Token(name, user, digest, created, role)
    return out


def _load(path: Path) -> dict[str, Token]:
    return _validate(path, _read(path))


def _dump(path: Path, tokens: dict[str, Token]) -> None:
    table: dict[str, dict[str, str]] = {}
    for t in sorted(tokens.values(), key=lambda t: t.name):
        table[t.name] = {"user": t.user, "hash": t.hash}
        if t.created:
            table[t.name]["created"] = t.created
        if t.role != "admin":
            table[t.name]["role"] = t.role
    write_toml_atomic(path, {"tokens": table})


class TokenDB:
    """The tokens of one file, optionally re-read when the file changes."""

    def __init__(self, tokens: dict[str, Token] | None = None, path: Path | None = None) -> None:
        self._tokens: dict[str, Token] = dict(tokens or {})
        self._entries = [(t.hash.encode(), t) for t in self._tokens.values()]
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0

    @classmethod
    def load(cls, path: Path) -> TokenDB:
        """Read and validate a tokens file (raises TokensFileError)."""
        db = cls(path=path)
        db._stamp = db._stat()
        db._replace(_load(path))
        return db

    def _replace(self, tokens: dict[str, Token]) -> None:
        self._tokens = tokens
        self._entries = [(t.hash.encode(), t) for t in tokens.values()]

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self, min_interval: float = 1.0) -> bool:
        """Re-read the file when it changed (checked at most every ``min_interval`` s).

        A file that vanished means no tokens; a malformed one raises TokensFileError and
        the previous tokens stay in force.
        """
        if self.path is None:
            return False
        now = time.monotonic()
        if now - self._checked < min_interval:
            return False
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self._replace({} if stamp is None else _load(self.path))
        return True

    def names(self) -> list[str]:
        """Sorted token names."""
        return sorted(self._tokens)

    def tokens(self) -> list[Token]:
        """Every token, sorted by name."""
        return [self._tokens[n] for n in self.names()]

    def __len__(self) -> int:
        return len(self._tokens)

    def lookup(self, token: str) -> Token | None:
        """The entry whose hash matches ``token`` (constant time over all entries)."""
        if not token or len(token) > _MAX_TOKEN_LEN:
            return None
        digest = hash_token(token).encode()
        found: Token | None = None
        for stored, entry in self._entries:
            if hmac.compare_digest(stored, digest):
                found = entry
        return found


def add_token(path: Path, name: str, user: str, replace: bool = False,
              role: str = "admin") -> str:
    """Create token ``name`` acting as ``user`` with ``role``; return the token (it is not
    stored).

    Raises ValueError for a bad name, user or role, or when the name exists and not
    ``replace``.
    """
    if role not in ROLES:
        raise ValueError(f"invalid role: {role!r} (use admin or read)")
    if not valid_token_name(name):
        raise ValueError(f"invalid token name: {name!r} (use A-Z a-z 0-9 . _ -)")
    if not valid_username(user):
        raise ValueError(f"invalid user name: {user!r}")
    tokens = _load(path) if path.exists() else {}
    if name in tokens and not replace:
        raise ValueError(f"token {name!r} already exists (remove it first, or use --replace)")
    token = generate_token()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tokens[name] = Token(name, user, hash_token(token), created, role)
    _dump(path, tokens)
    return token


def remove_token(path: Path, name: str) -> bool:
    """Remove token ``name``; False when there was no such token."""
    tokens = _load(path)
    if tokens.pop(name, None) is None:
        return False
    _dump(path, tokens)
    return True
