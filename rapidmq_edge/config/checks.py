"""The value checkers shared by every configuration table (``config*.py``).

:class:`ConfigError` and small validators that turn a TOML value into a typed setting or
raise a ConfigError whose message starts with the dotted key (``mqtt.max_qos: must be an
integer from 0 to 2, got 3``); :class:`Table` rejects unknown keys with a "did you mean"
hint. Pure functions: no file is read except to check that one exists (:func:`existing_file`).

Inside :func:`collecting`, problems are recorded instead of raised where the parse can go
on (a bad value: its default is used; a bad table or array item: it is left out), so one
run reports every problem; a problem raised after another one of the same table is taken
for its consequence and left out.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import SplitResult, urlsplit


class ConfigError(Exception):
    """Invalid configuration; ``key`` is the dotted key at fault (None for file errors)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ConfigErrors(ConfigError):
    """Several problems (``problems``, table by table); the message is one line each."""

    def __init__(self, problems: list[ConfigError]) -> None:
        super().__init__("\n".join(str(p) for p in problems), problems[0].key)
        self.problems = problems


def config_error(key: str, problem: str) -> ConfigError:
    return ConfigError(f"{key}: {problem}", key)


_problems: ContextVar[list[ConfigError] | None] = ContextVar("config_problems", default=None)


@contextlib.contextmanager
def collecting() -> Iterator[list[ConfigError]]:
    """Record problems (:func:`report`) instead of raising the first; the caller raises
    :func:`raise_collected` at the end."""
    token = _problems.set([])
    try:
        found = _problems.get()
        assert found is not None
        yield found
    finally:
        _problems.reset(token)


def _table_of(key: str | None) -> str:
    return (key or "").rsplit(".", 1)[0]


def report(exc: ConfigError, consequence_possible: bool = True) -> None:
    """Record ``exc`` while :func:`collecting` (else raise it). A problem raised after one of
    the same table (``consequence_possible``: not a plain value check) is left out: it is
    most likely the first one's consequence (a default used in its place)."""
    found = _problems.get()
    if found is None:
        raise exc
    if consequence_possible and any(_table_of(p.key) == _table_of(exc.key) for p in found):
        return
    found.append(exc)


def raise_collected(found: list[ConfigError]) -> None:
    """Raise what was collected: the one problem as it is, several as ConfigErrors."""
    if len(found) == 1:
        raise found[0]
    if found:
        raise ConfigErrors(found)


def section(parse: Callable[[], T], default: T) -> T:
    """``parse()``, or ``default`` when it raises a problem that is recorded (collecting)."""
    try:
        return parse()
    except ConfigError as exc:
        report(exc)
        return default


def items(values: list[Any], parse: Callable[[Any, str], T], key: str) -> list[T]:
    """Each array item parsed (``parse(item, "key[i]")``); a bad one is reported and left
    out while collecting."""
    out: list[T] = []
    for i, item in enumerate(values):
        try:
            out.append(parse(item, f"{key}[{i}]"))
        except ConfigError as exc:
            report(exc)
    return out


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
        self.key = key
        for name in data:
            if name not in allowed:
                report(unknown_key(self.sub(name), name, allowed), consequence_possible=False)
        self.data = {k: v for k, v in cast(dict[str, Any], data).items() if k in allowed}

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def get(self, name: str, check: Callable[[str, Any], T], default: T) -> T:
        """``check``ed value of ``name``, or ``default`` when absent (or bad, collecting)."""
        if name not in self.data:
            return default
        try:
            return check(self.sub(name), self.data[name])
        except ConfigError as exc:
            report(exc, consequence_possible=False)
            return default


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


def url_parts(key: str, value: Any) -> SplitResult:
    """``value`` as a URL string split into its parts, or a config error naming ``key``."""
    url = string(key, value)
    try:
        return urlsplit(url)
    except ValueError as exc:  # e.g. "mqtts://[:51]:8883": not an IPv6 address
        raise config_error(key, f"is not a URL: {exc} in {url!r}") from None


def path_under(base_dir: Path) -> Callable[[str, Any], Path]:
    def check(key: str, value: Any) -> Path:
        if not isinstance(value, str) or not value or "\x00" in value:
            raise config_error(key, f"must be a non-empty path string, got {show(value)}")
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # "~someone/..." of an unknown user
            raise config_error(key, f"names an unknown home directory: {value!r}") from None
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
