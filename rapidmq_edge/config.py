"""Gateway configuration: one TOML file, strictly validated at start-up.

Every problem raises :class:`ConfigError` whose message starts with the dotted key,
e.g. ``mqtt.max_packet_size: must be an integer from 16 to 268435455, got "big"``.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from rapidmq_edge.mqtt.topics import valid_topic_filter

if TYPE_CHECKING:
    from .config_forward import ForwardingSettings
    from .config_ingress import CoapSettings, HttpSettings
    from .config_intelligence import IntelligenceSettings

__all__ = [
    "ConfigError",
    "GatewaySettings",
    "TlsSettings",
    "ListenerSettings",
    "MqttSettings",
    "AuthSettings",
    "AclRule",
    "PersistenceSettings",
    "Config",
    "DEFAULT_PORTS",
    "parse_listener",
    "parse_config",
    "load_config",
]

Scheme = Literal["tcp", "tls", "ws", "wss"]
DEFAULT_PORTS: dict[str, int] = {"tcp": 1883, "tls": 8883, "ws": 8083, "wss": 8084}
DEFAULT_WS_PATH = "/mqtt"
LOG_LEVELS = ("debug", "info", "warning", "error")
_GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")
_U32_MAX = 0xFFFFFFFF


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


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """``[gateway]``: identity, data directory and log level."""

    id: str = "edge-1"
    data_dir: Path = Path("./data")
    log_level: str = "info"


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


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``[auth]``: anonymous access, users file and the ACL fallback decision."""

    allow_anonymous: bool = True
    users_file: Path | None = None
    acl_default: Literal["allow", "deny"] = "allow"


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``[[acl]]`` entry; ``topic`` may contain ``%u`` / ``%c`` placeholders."""

    user: str
    topic: str
    action: Literal["publish", "subscribe", "all"]
    access: Literal["allow", "deny"]


@dataclass(frozen=True, slots=True)
class PersistenceSettings:
    """``[persistence]``: durability of the session/message store."""

    durability: Literal["fsync", "normal"] = "fsync"
    commit_delay_ms: float = 5.0


def _default_forwarding() -> ForwardingSettings:
    from .config_forward import ForwardingSettings

    return ForwardingSettings()


def _default_coap() -> CoapSettings:
    from .config_ingress import CoapSettings

    return CoapSettings()


def _default_intelligence() -> IntelligenceSettings:
    from .config_intelligence import IntelligenceSettings

    return IntelligenceSettings()


def _default_http() -> HttpSettings:
    from .config_ingress import HttpSettings

    return HttpSettings()


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; ``warnings`` are for the runner to log."""

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    acl: tuple[AclRule, ...] = ()
    persistence: PersistenceSettings = field(default_factory=PersistenceSettings)
    source: Path | None = None
    warnings: tuple[str, ...] = ()
    #: ``[[upstream]]``, ``[[forward]]``, ``[[downstream]]``, ``[queue]`` (config_forward.py)
    forwarding: ForwardingSettings = field(default_factory=_default_forwarding)
    #: ``[coap]`` and ``[http]`` ingress (config_ingress.py); no listeners = disabled
    coap: CoapSettings = field(default_factory=_default_coap)
    http: HttpSettings = field(default_factory=_default_http)
    #: ``[intelligence]`` (config_intelligence.py); disabled unless enabled = true
    intelligence: IntelligenceSettings = field(default_factory=_default_intelligence)


# --------------------------------------------------------------------------- value checkers

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
        return _err(key, f"{problem}, got {_show(url)}")

    if not isinstance(url, str):
        raise _err(key, f"must be a listener URL string, got {_show(url)}")
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _listeners(key: str, value: Any) -> tuple[ListenerSettings, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _err(key, f"must be a non-empty array of listener URLs, got {_show(value)}")
    result: list[ListenerSettings] = []
    seen: set[tuple[str, int]] = set()
    for i, item in enumerate(items):
        listener = parse_listener(item, f"{key}[{i}]")
        addr = (listener.host, listener.port)
        if listener.port != 0 and addr in seen:
            raise _err(f"{key}[{i}]", f"duplicate address {listener.url}")
        seen.add(addr)
        result.append(listener)
    return tuple(result)


# --------------------------------------------------------------------------- sections

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
_TOP_KEYS = (
    "gateway", "mqtt", "auth", "acl", "persistence", "upstream", "forward", "downstream", "queue",
    "coap", "http", "security", "intelligence",
)


def _gateway(data: object, base_dir: Path) -> GatewaySettings:
    t = _Table(data, "gateway", ("id", "data_dir", "log_level"))
    d = GatewaySettings()
    gid = t.get("id", _str, d.id)
    if not _GATEWAY_ID_RE.fullmatch(gid):
        raise _err("gateway.id", f"must be 1-64 characters of A-Z a-z 0-9 _ . -, got {_show(gid)}")
    return GatewaySettings(
        id=gid,
        data_dir=t.get("data_dir", _path(base_dir), d.data_dir),
        log_level=t.get("log_level", _choice(*LOG_LEVELS), d.log_level),
    )


def _tls(data: object, base_dir: Path, key: str = "mqtt.tls") -> TlsSettings:
    """Validate a TLS table (``[mqtt.tls]``, ``[http.tls]``): files must exist."""
    t = _Table(data, key, ("cert", "key", "client_ca", "require_client_cert"))
    for name in ("cert", "key"):
        if name not in t.data:
            raise _err(t.sub(name), "required")
    files = _existing_file(base_dir)
    tls = TlsSettings(
        cert=t.get("cert", files, Path()),
        key=t.get("key", files, Path()),
        client_ca=t.get("client_ca", files, None),
        require_client_cert=t.get("require_client_cert", _bool, False),
    )
    if tls.require_client_cert and tls.client_ca is None:
        raise _err(f"{key}.client_ca", "required when require_client_cert = true")
    return tls


def _mqtt(data: object, base_dir: Path) -> MqttSettings:
    t = _Table(data, "mqtt", _MQTT_KEYS)
    kwargs: dict[str, Any] = {}
    for name, (lo, hi) in _INT_LIMITS.items():
        if name in t.data:
            kwargs[name] = _int(lo, hi)(t.sub(name), t.data[name])
    for name, (flo, fhi) in _FLOAT_LIMITS.items():
        if name in t.data:
            kwargs[name] = _float(flo, fhi)(t.sub(name), t.data[name])
    for name in _BOOL_KEYS:
        if name in t.data:
            kwargs[name] = _bool(t.sub(name), t.data[name])
    if "listen" in t.data:
        kwargs["listen"] = _listeners("mqtt.listen", t.data["listen"])
    if "tls" in t.data:
        kwargs["tls"] = _tls(t.data["tls"], base_dir)
    settings = MqttSettings(**kwargs)
    if settings.tls is None:
        for i, listener in enumerate(settings.listen):
            if listener.is_tls:
                raise _err("mqtt.tls", f"required because mqtt.listen[{i}] is {listener.url}")
    return settings


def _auth(data: object, base_dir: Path) -> AuthSettings:
    t = _Table(data, "auth", ("allow_anonymous", "users_file", "acl_default"))
    return AuthSettings(
        allow_anonymous=t.get("allow_anonymous", _bool, True),
        users_file=t.get("users_file", _path(base_dir), None),
        acl_default=cast(
            Literal["allow", "deny"], t.get("acl_default", _choice("allow", "deny"), "allow")
        ),
    )


def _acl_rule(data: object, key: str) -> AclRule:
    t = _Table(data, key, ("user", "topic", "action", "access"))
    for name in ("user", "topic", "access"):
        if name not in t.data:
            raise _err(t.sub(name), "required")
    user = t.get("user", _str, "")
    if not user:
        raise _err(t.sub("user"), 'must be a user name or "*", got ""')
    topic = t.get("topic", _str, "")
    if not valid_topic_filter(topic):
        raise _err(t.sub("topic"), f"must be a valid MQTT topic filter, got {_show(topic)}")
    if topic.startswith("$share/"):
        raise _err(t.sub("topic"), "must not use $share/ (rules apply to the inner filter)")
    return AclRule(
        user=user,
        topic=topic,
        action=cast(
            Literal["publish", "subscribe", "all"],
            t.get("action", _choice("publish", "subscribe", "all"), "all"),
        ),
        access=cast(Literal["allow", "deny"], t.get("access", _choice("allow", "deny"), "")),
    )


def _acl(value: object) -> tuple[AclRule, ...]:
    if not isinstance(value, list):
        raise _err("acl", f"must be an array of tables ([[acl]]), got {_show(value)}")
    return tuple(_acl_rule(item, f"acl[{i}]") for i, item in enumerate(value))


def _persistence(data: object) -> PersistenceSettings:
    t = _Table(data, "persistence", ("durability", "commit_delay_ms"))
    return PersistenceSettings(
        durability=cast(
            Literal["fsync", "normal"], t.get("durability", _choice("fsync", "normal"), "fsync")
        ),
        commit_delay_ms=t.get("commit_delay_ms", _float(0.0, 1000.0), 5.0),
    )


def _warnings(mqtt: MqttSettings, auth: AuthSettings) -> tuple[str, ...]:
    out: list[str] = []
    if auth.allow_anonymous:
        exposed = [li.url for li in mqtt.listen if not _is_loopback(li.host)]
        if exposed:
            out.append(
                "auth.allow_anonymous is true and these listeners are reachable from the "
                f"network: {', '.join(exposed)}; any client can connect without a password"
            )
    elif auth.users_file is None:
        out.append(
            "auth.allow_anonymous is false and auth.users_file is not set: "
            "no username/password login can succeed"
        )
    if mqtt.tls is not None and not any(li.is_tls for li in mqtt.listen):
        out.append("mqtt.tls is set but no listener uses tls:// or wss://")
    return tuple(out)


def parse_config(data: Mapping[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Validate a decoded TOML document; relative paths resolve against ``base_dir``."""
    top = _Table(dict(data), "", _TOP_KEYS)
    gateway = _gateway(top.data.get("gateway", {}), base_dir)
    mqtt = _mqtt(top.data.get("mqtt", {}), base_dir)
    auth = _auth(top.data.get("auth", {}), base_dir)
    acl = _acl(top.data.get("acl", []))
    persistence = _persistence(top.data.get("persistence", {}))
    from .config_forward import parse_forwarding
    from .config_ingress import parse_coap, parse_http

    forwarding = parse_forwarding(top.data, base_dir)
    coap = parse_coap(top.data.get("coap", {}), base_dir)
    http = parse_http(top.data.get("http", {}), base_dir)
    from .config_intelligence import parse_intelligence

    intelligence = parse_intelligence(top.data.get("intelligence", {}), base_dir)
    return Config(
        gateway, mqtt, auth, acl, persistence, source, _warnings(mqtt, auth), forwarding,
        coap, http, intelligence=intelligence,
    )


def load_config(path: Path | None) -> Config:
    """Load and validate ``path``; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    source = path.resolve()
    return parse_config(data, source.parent, source)
