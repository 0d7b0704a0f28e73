"""Reading and writing the gateway's TOML files: the configuration, users and tokens.

One reader gives every file the same errors (each names the file); one writer replaces a
file atomically with owner-only permissions (users and tokens carry password and token
hashes).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .checks import ConfigError

__all__ = ["named_tables", "read_toml", "write_toml_atomic"]


def read_toml(
    path: Path, kind: str, error: type[ConfigError] = ConfigError, say_missing: bool = True
) -> dict[str, Any]:
    """The decoded TOML document of ``path``; raises ``error`` naming ``path`` and ``kind``
    ("users file", …). ``say_missing``: a missing file gets "not found" (else the OS error)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        if say_missing:
            raise error(f"{path}: {kind} not found") from exc
        raise error(f"{path}: cannot read {kind}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise error(f"{path}: cannot read {kind}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {kind} is not valid UTF-8 ({exc.reason} at byte {exc.start})") \
            from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: invalid TOML: {exc}") from exc


def named_tables(
    path: Path, data: dict[str, Any], section: str, error: type[ConfigError],
    valid_name: Callable[[str], bool], bad_name: str, keys: tuple[str, ...], shape: str,
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """The ``[section.NAME]`` tables of a decoded file (users, tokens): only ``section`` at
    the top, a table of tables, names ``valid_name`` accepts (else ``bad_name``), only
    ``keys`` in each (a non-table entry: ``shape``). Yields (name, dotted key, entry)."""
    extra = [k for k in data if k != section]
    if extra:
        raise error(f'{path}: {extra[0]}: unknown key (expected only "[{section}.NAME]")')
    tables = data.get(section, {})
    if not isinstance(tables, dict):
        raise error(f"{path}: {section}: must be a table of [{section}.NAME] tables")
    for name, entry in tables.items():
        key = f"{section}.{name}"
        if not valid_name(name):
            raise error(f"{path}: {key}: {bad_name}")
        if not isinstance(entry, dict):
            raise error(f"{path}: {key}: {shape}")
        unknown = [k for k in entry if k not in keys]
        if unknown:
            raise error(f"{path}: {key}.{unknown[0]}: unknown key")
        yield name, key, entry


def write_toml_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write TOML to ``path`` via a 0600 temp file, fsync and ``os.replace`` (then fsync
    the directory): a crash leaves the old file or the new one, never half of one."""
    import tomli_w  # only needed by the CLI, so imported lazily

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            tomli_w.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
