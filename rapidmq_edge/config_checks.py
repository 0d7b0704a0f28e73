"""The value checkers shared by every configuration table (``config*.py``).

:class:`ConfigError` and small validators that turn a TOML value into a typed setting or
raise a ConfigError whose message starts with the dotted key (``mqtt.max_qos: must be an
integer from 0 to 2, got 3``); :class:`_Table` rejects unknown keys with a "did you mean"
hint. Pure functions: no file is read except to check that one exists (:func:`_existing_file`).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast


class ConfigError(Exception):
    """Invalid configuration; ``key`` is the dotted key at fault (None for file errors)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _err(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key)


def _show(value: object) -> str:
    """Render a bad value the way it would look in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


T = TypeVar("T")


class _Table:
    """A TOML table being validated: tracks its dotted prefix, rejects unknown keys."""

    def __init__(self, data: object, key: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise _err(key, f"must be a table, got {_show(data)}")
        self.data = cast(dict[str, Any], data)
        self.key = key
        for name in self.data:
            if name not in allowed:
                raise _unknown(self.sub(name), name, allowed)

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, check: Callable[[str, Any], T], default: T) -> T:
        if name not in self.data:
            return default
        return check(self.sub(name), self.data[name])


def _unknown(key: str, name: str, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return _err(key, f"unknown key{hint}")


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _err(key, f"must be an integer from {lo} to {hi}, got {_show(value)}")
        return value

    return check


def _float(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise _err(key, f"must be a number from {lo:g} to {hi:g}, got {_show(value)}")
        return float(value)

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _err(key, f"must be true or false, got {_show(value)}")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _err(key, f"must be a string, got {_show(value)}")
    return value


def _choice(*options: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in options:
            listed = ", ".join(f'"{o}"' for o in options)
            raise _err(key, f"must be one of {listed}, got {_show(value)}")
        return cast(str, value)

    return check


def _path(base_dir: Path) -> Callable[[str, Any], Path]:
    def check(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise _err(key, f"must be a non-empty path string, got {_show(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    return check


def _existing_file(base_dir: Path) -> Callable[[str, Any], Path]:
    to_path = _path(base_dir)

    def check(key: str, value: Any) -> Path:
        p = to_path(key, value)
        if not p.is_file():
            raise _err(key, f"file not found: {p}")
        return p

    return check
