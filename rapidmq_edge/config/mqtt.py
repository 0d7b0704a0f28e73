"""MQTT listener configuration: ``[mqtt]``, its ``listen`` URLs and ``[mqtt.tls]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`;
:func:`parse_tls` also checks the ``[http.tls]`` table (:mod:`rapidmq_edge.ingress`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from .checks import (
    ConfigError,
    Table,
    boolean,
    config_error,
    existing_file,
    float_range,
    int_range,
    show,
)

__all__ = [
    "DEFAULT_PORTS",
    "ListenerSettings",
    "MqttSettings",
    "TlsSettings",
    "parse_listener",
    "parse_mqtt",
    "parse_tls",
]

Scheme = Literal["tcp", "tls", "ws", "wss"]
DEFAULT_PORTS: dict[str, int] = {"tcp": 1883, "tls": 8883, "ws": 8083, "wss": 8084}
DEFAULT_WS_PATH = "/mqtt"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``[mqtt.tls]``: server certificate and optional client-certificate checking."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """One ``mqtt.listen`` URL; ``host`` has no IPv6 brackets, ``path`` is "" for tcp/tls."""

    url: str
    scheme: Scheme
    host: str
    port: int
    path: str

    @property
    def is_tls(self) -> bool:
        """True for tls:// and wss:// listeners."""
        return self.scheme in ("tls", "wss")

    @property
    def is_websocket(self) -> bool:
        """True for ws:// and wss:// listeners."""
        return self.scheme in ("ws", "wss")


_DEFAULT_LISTENER = ListenerSettings("tcp://127.0.0.1:1883", "tcp", "127.0.0.1", 1883, "")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """``[mqtt]``: listeners and broker limits.

    A ``publish_burst`` of 0 with a non-zero ``publish_rate`` is resolved to
    ``max(1, ceil(publish_rate))`` on construction.
    """

    listen: tuple[ListenerSettings, ...] = (_DEFAULT_LISTENER,)
    tls: TlsSettings | None = None
    max_packet_size: int = 1048576
    max_connections: int = 10000
    receive_maximum: int = 100
    max_inflight_messages: int = 100
    max_queued_messages: int = 1000
    max_queued_bytes: int = 0
    max_session_expiry: int = 604800
    server_keep_alive: int = 0
    max_keep_alive: int = 65535
    topic_alias_maximum: int = 10
    retain_available: bool = True
    max_qos: int = 2
    sys_interval: float = 10.0
    publish_rate: float = 0.0
    publish_burst: int = 0
    connect_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.publish_rate > 0 and self.publish_burst == 0:
            object.__setattr__(self, "publish_burst", max(1, math.ceil(self.publish_rate)))


# --------------------------------------------------------------------------- listeners


def _parse_host(host: str, bracketed: bool) -> str | None:
    """Validated host (without brackets) or None when invalid."""
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return host
    try:
        ipaddress.IPv4Address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host) or host.replace(".", "").isdigit():
        return None
    return host.lower()


def parse_listener(url: str, key: str = "mqtt.listen") -> ListenerSettings:
    """Parse ``scheme://host[:port][/path]``; raises ConfigError naming ``key``."""

    def bad(problem: str) -> ConfigError:
        return config_error(key, f"{problem}, got {show(url)}")

    if not isinstance(url, str):
        raise config_error(key, f"must be a listener URL string, got {show(url)}")
    scheme, sep, rest = url.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise bad('must be a URL starting with "tcp://", "tls://", "ws://" or "wss://"')
    if any(c in rest for c in "?#@ "):
        raise bad("must not contain user info, query, fragment or spaces")
    slash = rest.find("/")
    netloc, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise bad('has an unterminated "[" in the host')
        raw_host, tail, bracketed = netloc[1:end], netloc[end + 1 :], True
        if tail and not tail.startswith(":"):
            raise bad('expects ":port" after "]"')
        port_str = tail[1:] if tail else None
    else:
        if netloc.count(":") > 1:
            raise bad("needs brackets around an IPv6 address, e.g. [::1]")
        raw_host, colon, port_s = netloc.partition(":")
        port_str, bracketed = (port_s if colon else None), False
    host = _parse_host(raw_host, bracketed)
    if host is None:
        raise bad("has an invalid host")
    if port_str is None:
        port = DEFAULT_PORTS[scheme]
    elif port_str.isdigit() and port_str.isascii() and int(port_str) <= 65535:
        port = int(port_str)
    else:
        raise bad("has an invalid port (must be 0..65535)")
    if scheme in ("ws", "wss"):
        path = path or DEFAULT_WS_PATH
    elif path not in ("", "/"):
        raise bad(f"must not have a path for {scheme}://")
    else:
        path = ""
    shown = f"[{host}]" if bracketed else host
    return ListenerSettings(
        f"{scheme}://{shown}:{port}{path}", cast(Scheme, scheme), host, port, path
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _listeners(key: str, value: Any) -> tuple[ListenerSettings, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise config_error(key, f"must be a non-empty array of listener URLs, got {show(value)}")
    result: list[ListenerSettings] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(items):
        listener = parse_listener(item, f"{key}[{i}]")
        addr = (listener.host, listener.port)
        if listener.port != 0 and addr in seen:
            raise config_error(f"{key}[{i}]", f"duplicate address {listener.url}")
        seen.add(addr)
        result.append(listener)
    return tuple(result)


# --------------------------------------------------------------------------- [mqtt]

_INT_LIMITS: dict[str, tuple[int, int]] = {
    "max_packet_size": (16, 268435455),
    "max_connections": (1, 10_000_000),
    "receive_maximum": (1, 65535),
    "max_inflight_messages": (1, 65535),
    "max_queued_messages": (1, 10_000_000),
    "max_queued_bytes": (0, 2**63 - 1),
    "max_session_expiry": (0, _U32_MAX),
    "server_keep_alive": (0, 65535),
    "max_keep_alive": (1, 65535),
    "topic_alias_maximum": (0, 65535),
    "max_qos": (0, 2),
    "publish_burst": (0, 1_000_000_000),
}
_FLOAT_LIMITS: dict[str, tuple[float, float]] = {
    "sys_interval": (0.0, 86400.0),
    "publish_rate": (0.0, 1_000_000.0),
    "connect_rate": (0.0, 1_000_000.0),
}
_BOOL_KEYS = ("retain_available",)
_MQTT_KEYS = ("listen", "tls", *_INT_LIMITS, *_FLOAT_LIMITS, *_BOOL_KEYS)


def parse_tls(data: object, base_dir: Path, key: str = "mqtt.tls") -> TlsSettings:
    """Validate a TLS table (``[mqtt.tls]``, ``[http.tls]``): files must exist."""
    t = Table(data, key, ("cert", "key", "client_ca", "require_client_cert"))
    for name in ("cert", "key"):
        if name not in t.data:
            raise config_error(t.sub(name), "required")
    files = existing_file(base_dir)
    tls = TlsSettings(
        cert=t.get("cert", files, Path()),
        key=t.get("key", files, Path()),
        client_ca=t.get("client_ca", files, None),
        require_client_cert=t.get("require_client_cert", boolean, False),
    )
    if tls.require_client_cert and tls.client_ca is None:
        raise config_error(f"{key}.client_ca", "required when require_client_cert = true")
    return tls


def parse_mqtt(data: object, base_dir: Path) -> MqttSettings:
    """Validate ``[mqtt]`` (and its ``[mqtt.tls]``)."""
    t = Table(data, "mqtt", _MQTT_KEYS)
    checks: dict[str, Any] = {
        **{name: int_range(lo, hi) for name, (lo, hi) in _INT_LIMITS.items()},
        **{name: float_range(flo, fhi) for name, (flo, fhi) in _FLOAT_LIMITS.items()},
        **{name: boolean for name in _BOOL_KEYS},
        "listen": _listeners,
        "tls": lambda _key, value: parse_tls(value, base_dir),
    }
    kwargs: dict[str, Any] = {}
    for name, check in checks.items():
        value = t.get(name, check, None)
        if value is not None:
            kwargs[name] = value
    settings = MqttSettings(**kwargs)
    if settings.tls is None:
        for i, listener in enumerate(settings.listen):
            if listener.is_tls:
                raise config_error(
                    "mqtt.tls", f"required because mqtt.listen[{i}] is {listener.url}")
    return settings
