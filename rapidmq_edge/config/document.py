"""Gateway configuration: one TOML file, strictly validated at start-up.

Every problem raises :class:`ConfigError` whose message starts with the dotted key,
e.g. ``mqtt.max_packet_size: must be an integer from 16 to 268435455, got "big"``.

This module holds :class:`Config`, ``[gateway]``, ``[persistence]`` and the loader; the
other tables live beside it, one module per family: ``[auth]``/``[[acl]]`` in
:mod:`.access`, ``[mqtt]`` in :mod:`.mqtt`, ``[[upstream]]``/``[[forward]]``/
``[[downstream]]``/``[queue]`` in :mod:`.forwarding`, ``[security]`` in :mod:`.security`,
``[coap]``/``[http]`` in :mod:`.ingress`, ``[intelligence]`` in :mod:`.intelligence`; the
shared value checkers in :mod:`.checks`, the file reader in :mod:`.files`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from .access import AclRule, AuthSettings, parse_acl, parse_auth
from .checks import (
    Table,
    collecting,
    config_error,
    float_range,
    int_range,
    one_of,
    path_under,
    raise_collected,
    section,
    show,
    string,
)
from .files import read_toml
from .forwarding import ForwardingSettings, parse_forwarding
from .ingress import CoapSettings, HttpSettings, parse_coap, parse_http
from .intelligence import IntelligenceSettings, parse_intelligence
from .mqtt import MqttSettings, is_loopback, parse_mqtt
from .operations import (
    FleetSettings,
    HealthSettings,
    MetricsSettings,
    parse_fleet,
    parse_health,
    parse_metrics,
)
from .ota import OtaSettings, parse_ota
from .retention import RetentionRule, parse_retention

__all__ = [
    "Config", "GatewaySettings", "LogSettings", "PersistenceSettings", "load_config",
    "parse_config",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
_GATEWAY_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """``[gateway]``: identity, data directory, its disk headroom and the log level."""

    id: str = "edge-1"
    data_dir: Path = Path("./data")
    log_level: str = "info"
    #: free bytes kept on the data directory's disk: below it new forwarded messages are
    #: refused so that what is queued can always be delivered and deleted
    disk_reserve: int = 8 << 20
    #: a file of this many bytes in the data directory, deleted when the disk fills anyway
    disk_ballast: int = 2 << 20


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: where the log goes and how much of it (``gateway.log_level`` is the level
    when ``[log] level`` is not set)."""

    level: str = "info"
    #: a file to write instead of stderr, rotated at ``max_bytes`` keeping ``backups``
    file: Path | None = None
    max_bytes: int = 10 << 20
    backups: int = 3


@dataclass(frozen=True, slots=True)
class PersistenceSettings:
    """``[persistence]``: durability of the session/message store."""

    durability: Literal["fsync", "normal"] = "fsync"
    commit_delay_ms: float = 5.0


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
    #: ``[[upstream]]``, ``[[forward]]``, ``[[downstream]]``, ``[queue]`` (:mod:`.forwarding`)
    forwarding: ForwardingSettings = field(default_factory=ForwardingSettings)
    #: ``[coap]`` and ``[http]`` ingress (:mod:`.ingress`); no listeners = disabled
    coap: CoapSettings = field(default_factory=CoapSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    #: ``[intelligence]`` (:mod:`.intelligence`); disabled unless enabled = true
    intelligence: IntelligenceSettings = field(default_factory=IntelligenceSettings)
    #: ``[log]``
    log: LogSettings = field(default_factory=LogSettings)
    #: ``[ota]`` (:mod:`.ota`); disabled unless enabled = true
    ota: OtaSettings = field(default_factory=OtaSettings)
    #: ``[metrics]``, ``[health]``, ``[fleet]`` (:mod:`.operations`)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    #: ``[[retention]]`` (:mod:`.retention`): the longest messages are kept, per filter
    retention: tuple[RetentionRule, ...] = ()


# --------------------------------------------------------------------------- sections

_TOP_KEYS = (
    "gateway", "mqtt", "auth", "acl", "persistence", "upstream", "forward", "downstream", "queue",
    "coap", "http", "security", "intelligence", "log", "ota", "metrics", "health", "fleet",
    "retention",
)


def _gateway(data: object, base_dir: Path) -> GatewaySettings:
    t = Table(data, "gateway", ("id", "data_dir", "log_level", "disk_reserve", "disk_ballast"))
    d = GatewaySettings()
    gid = t.get("id", string, d.id)
    if not _GATEWAY_ID_RE.fullmatch(gid):
        raise config_error("gateway.id",
                           f"must be 1-64 characters of A-Z a-z 0-9 _ . -, got {show(gid)}")
    return GatewaySettings(
        id=gid,
        data_dir=t.get("data_dir", path_under(base_dir), d.data_dir),
        log_level=t.get("log_level", one_of(*LOG_LEVELS), d.log_level),
        disk_reserve=t.get("disk_reserve", int_range(0, 1 << 40), d.disk_reserve),
        disk_ballast=t.get("disk_ballast", int_range(0, 1 << 40), d.disk_ballast),
    )


def _log(data: object, base_dir: Path, level: str) -> LogSettings:
    t = Table(data, "log", ("level", "file", "max_bytes", "backups"))
    return LogSettings(
        level=t.get("level", one_of(*LOG_LEVELS), level),
        file=t.get("file", path_under(base_dir), None),
        max_bytes=t.get("max_bytes", int_range(0, 1 << 40), 10 << 20),
        backups=t.get("backups", int_range(0, 100), 3),
    )


def _persistence(data: object) -> PersistenceSettings:
    t = Table(data, "persistence", ("durability", "commit_delay_ms"))
    return PersistenceSettings(
        durability=cast(
            Literal["fsync", "normal"], t.get("durability", one_of("fsync", "normal"), "fsync")
        ),
        commit_delay_ms=t.get("commit_delay_ms", float_range(0.0, 1000.0), 5.0),
    )


def _warnings(mqtt: MqttSettings, auth: AuthSettings) -> tuple[str, ...]:
    out: list[str] = []
    if auth.allow_anonymous:
        exposed = [li.url for li in mqtt.listen if not is_loopback(li.host)]
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
    """Validate a decoded TOML document; relative paths resolve against ``base_dir``.

    Every problem found is reported: one raises a ConfigError, several a ConfigErrors (its
    message one line per problem, table by table)."""
    with collecting() as found:
        config = _parse(data, base_dir, source)
    raise_collected(found)
    return config


def _parse(data: Mapping[str, Any], base_dir: Path, source: Path | None) -> Config:
    top = Table(dict(data), "", _TOP_KEYS).data
    gateway = section(lambda: _gateway(top.get("gateway", {}), base_dir), GatewaySettings())
    mqtt = section(lambda: parse_mqtt(top.get("mqtt", {}), base_dir), MqttSettings())
    auth = section(lambda: parse_auth(top.get("auth", {}), base_dir), AuthSettings())
    no_rules: tuple[AclRule, ...] = ()
    acl = section(lambda: parse_acl(top.get("acl", [])), no_rules)
    persistence = section(lambda: _persistence(top.get("persistence", {})),
                          PersistenceSettings())
    forwarding = section(lambda: parse_forwarding(top, base_dir), ForwardingSettings())
    coap = section(lambda: parse_coap(top.get("coap", {}), base_dir), CoapSettings())
    http = section(lambda: parse_http(top.get("http", {}), base_dir), HttpSettings())
    intelligence = section(lambda: parse_intelligence(top.get("intelligence", {}), base_dir),
                           IntelligenceSettings())
    log = section(lambda: _log(top.get("log", {}), base_dir, gateway.log_level),
                  LogSettings(gateway.log_level))
    ota = section(lambda: parse_ota(top.get("ota", {}), base_dir,
                                    [u.name for u in forwarding.upstreams]), OtaSettings())
    metrics = section(lambda: parse_metrics(top.get("metrics", {})), MetricsSettings())
    health = section(lambda: parse_health(top.get("health", {})), HealthSettings())
    fleet = section(lambda: parse_fleet(top.get("fleet", {}),
                                        [u.name for u in forwarding.upstreams]), FleetSettings())
    no_retention: tuple[RetentionRule, ...] = ()
    retention = section(lambda: parse_retention(top.get("retention", [])), no_retention)
    warnings = _warnings(mqtt, auth)
    if isinstance(top.get("intelligence"), dict) and "alert_cooldown_s" in top["intelligence"]:
        warnings += ("intelligence.alert_cooldown_s is no longer used: an anomaly incident "
                     "closes after intelligence.episode_close_readings normal readings",)
    return Config(
        gateway, mqtt, auth, acl, persistence, source, warnings, forwarding,
        coap, http, intelligence=intelligence, log=log, ota=ota, metrics=metrics,
        health=health, fleet=fleet, retention=retention,
    )


def load_config(path: Path | None) -> Config:
    """Load and validate ``path``; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    data = read_toml(path, "config file", say_missing=False)
    source = path.resolve()
    return parse_config(data, source.parent, source)
