"""Gateway configuration: one TOML file, strictly validated at start-up (see :mod:`.document`).

The names a caller needs are here; each table family has its module (:mod:`.access`,
:mod:`.mqtt`, :mod:`.ingress`, :mod:`.forwarding`, :mod:`.security`, :mod:`.intelligence`).
"""

from .access import AclRule, AuthSettings
from .checks import ConfigError, ConfigErrors
from .document import (
    Config,
    GatewaySettings,
    LogSettings,
    PersistenceSettings,
    load_config,
    parse_config,
)
from .mqtt import DEFAULT_PORTS, ListenerSettings, MqttSettings, TlsSettings, parse_listener

__all__ = [
    "DEFAULT_PORTS",
    "AclRule",
    "AuthSettings",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "GatewaySettings",
    "ListenerSettings",
    "LogSettings",
    "MqttSettings",
    "PersistenceSettings",
    "TlsSettings",
    "load_config",
    "parse_config",
    "parse_listener",
]
