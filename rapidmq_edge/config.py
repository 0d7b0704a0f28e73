"""Gateway configuration: one TOML file, strictly validated at start-up.

Every problem raises :class:`ConfigError` whose message starts with the dotted key,
e.g. ``mqtt.max_packet_size: must be an integer from 16 to 268435455, got "big"``.

This module holds :class:`Config`, ``[gateway]``, ``[auth]``, ``[[acl]]``, ``[persistence]``
and the loader; the other tables live beside it: ``[mqtt]`` in :mod:`.config_mqtt`,
``[[upstream]]``/``[[forward]]``/``[[downstream]]``/``[queue]`` in :mod:`.config_forward`,
``[security]`` in :mod:`.config_security`, ``[coap]``/``[http]`` in :mod:`.config_ingress`,
``[intelligence]`` in :mod:`.config_intelligence`; the shared value checkers in
:mod:`.config_checks`.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from rapidmq_edge.mqtt.topics import valid_topic_filter

from .config_checks import (
    ConfigError,
    _bool,
    _choice,
    _err,
    _float,
    _path,
    _show,
    _str,
    _Table,
)
from .config_mqtt import (
    DEFAULT_PORTS,
    ListenerSettings,
    MqttSettings,
    TlsSettings,
    _is_loopback,
    parse_listener,
    parse_mqtt,
)

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

LOG_LEVELS = ("debug", "info", "warning", "error")
_GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """``[gateway]``: identity, data directory and log level."""

    id: str = "edge-1"
    data_dir: Path = Path("./data")
    log_level: str = "info"


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


# --------------------------------------------------------------------------- sections

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
    mqtt = parse_mqtt(top.data.get("mqtt", {}), base_dir)
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
