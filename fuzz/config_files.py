"""Fuzz the TOML files the gateway reads: the configuration (``load_config``), the users
file (``UserDB.load``) and the HTTP tokens file (``TokenDB.load``).

Input: one mode byte (``byte % 3``: 0 configuration, 1 users, 2 tokens), then the file's
bytes, written to a scratch folder and loaded from there.

Invariants:

* only the loader's own error escapes: ``ConfigError`` from ``load_config``,
  ``UsersFileError`` from ``UserDB.load``, ``TokensFileError`` from ``TokenDB.load``;
* a configuration that loads validates the same from its decoded TOML (``parse_config``);
* a users or tokens file that loads, written back the way the CLI writes it
  (``write_toml_atomic``), loads again to the same users or tokens.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from rapidmq_edge.config import ConfigError, load_config, parse_config
    from rapidmq_edge.config.files import write_toml_atomic
    from rapidmq_edge.security.tokens import TokenDB, TokensFileError
    from rapidmq_edge.security.users import UserDB, UsersFileError, valid_username

__all__ = ["check", "main"]

TARGET = "config_files"
_EXISTING = ("server.crt", "server.key", "devices-ca.crt", "cloud-ca.pem", "plant-7.crt",
             "plant-7.key")


@functools.cache
def scratch() -> Path:
    """A private folder for the files under test: in ``$TMPDIR`` when set (fuzz/run.py sets
    it to its scratch folder), else in memory when /dev/shm exists."""
    shm = Path("/dev/shm")
    base = None if os.environ.get("TMPDIR") or not shm.is_dir() else shm
    folder = Path(tempfile.mkdtemp(prefix="fuzz-config-", dir=base))
    atexit.register(shutil.rmtree, folder, True)
    # the files the documented examples name, so that their TLS tables validate
    (folder / "tls").mkdir()
    for name in _EXISTING:
        (folder / "tls" / name).write_text("")
    return folder


def check_config(path: Path) -> None:
    try:
        config = load_config(path)
    except ConfigError:
        return
    source = path.resolve()
    again = parse_config(tomllib.loads(path.read_text("utf-8")), source.parent, source)
    assert again == config, "load_config and parse_config disagree"


def check_users(path: Path) -> None:
    try:
        db = UserDB.load(path)
    except UsersFileError:
        return
    names = db.names()
    assert all(valid_username(n) for n in names)
    copy = path.with_name("users-copy.toml")
    data = tomllib.loads(path.read_text("utf-8"))
    users = {n: {"password": data["users"][n]["password"]} for n in names}
    write_toml_atomic(copy, {"users": users})
    assert UserDB.load(copy).names() == names, "users file does not survive a rewrite"


def check_tokens(path: Path) -> None:
    try:
        db = TokenDB.load(path)
    except TokensFileError:
        return
    tokens = db.tokens()
    copy = path.with_name("tokens-copy.toml")
    table: dict[str, dict[str, str]] = {}
    for t in tokens:
        table[t.name] = {"user": t.user, "hash": t.hash}
        if t.created:
            table[t.name]["created"] = t.created
    write_toml_atomic(copy, {"tokens": table})
    assert TokenDB.load(copy).tokens() == tokens, "tokens file does not survive a rewrite"


_MODES = (("config.toml", check_config), ("users.toml", check_users),
          ("tokens.toml", check_tokens))


def check(data: bytes) -> None:
    """Raise (AssertionError or the escaping exception) when an invariant breaks."""
    if not data:
        return
    name, fn = _MODES[data[0] % len(_MODES)]
    path = scratch() / name
    path.write_bytes(data[1:])
    fn(path)


def main() -> None:
    """Run under atheris: ``python -m fuzz.config_files [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
