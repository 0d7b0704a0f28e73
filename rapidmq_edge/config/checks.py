"""The value checkers shared by every configuration table (``config*.py``).

:class:`ConfigError` and small validators that turn a TOML value into a typed setting or
raise a ConfigError whose message starts with the dotted key (``mqtt.max_qos: must be an
integer from 0 to 2, got 3``); :class:`Table` rejects unknown keys with a "did you mean"
hint. Pure functions: no file is read except to check that one exists (:func:`existing_file`).
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


def config_error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key)


def show(value: object) -> str:
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


class Table:
    """A TOML table being validated: tracks its dotted prefix, rejects unknown keys."""

    def __init__(self, data: object, key: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise config_error(key, f"must be a table, got {show(data)}")
        self.data = cast(dict[str, Any], data)
        self.key = key
        for name in self.data:
            if name not in allowed:
                raise unknown_key(self.sub(name), name, allowed)

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, check: Callable[[str, Any], T], default: T) -> T:
        if name not in self.data:
            return default
        return check(self.sub(name), self.data[name])


def unknown_key(key: str, name: str, allowed: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return config_error(key, f"unknown key{hint}")


def int_range(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise config_error(key, f"must be an integer from {lo} to {hi}, got {show(value)}")
        return value

    return check


def float_range(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            raise config_error(key, f"must be a number from {lo:g} to {hi:g}, got {show(value)}")
        return float(value)

    return check


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise config_error(key, f"must be true or false, got {show(value)}")
    return value


def string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise config_error(key, f"must be a string, got {show(value)}")
    return value


def one_of(*options: str) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if value not in options:
            listed = ", ".join(f'"{o}"' for o in options)
            raise config_error(key, f"must be one of {listed}, got {show(value)}")
        return cast(str, value)

    return check


def path_under(base_dir: Path) -> Callable[[str, Any], Path]:
    def check(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise config_error(key, f"must be a non-empty path string, got {show(value)}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    return check


def existing_file(base_dir: Path) -> Callable[[str, Any], Path]:
    to_path = path_under(base_dir)

    def check(key: str, value: Any) -> Path:
        p = to_path(key, value)
        if not p.is_file():
            raise config_error(key, f"file not found: {p}")
        return p

    return check
