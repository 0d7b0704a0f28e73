"""What a CONNECT gets: keep-alive, session expiry, flow-control limits, CONNACK properties.

Pure functions of the CONNECT packet and the configured limits (no I/O), so every rule of
MQTT-3.1.2 / 3.2.2 that depends only on them is decided, and tested, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..mqtt import reasons as rc
from ..mqtt.packets import MQTT_5, Connect
from .session import NEVER_EXPIRES


@dataclass(slots=True)
class ConnectionSettings:
    """Per-connection limits taken from ``[mqtt]``."""

    max_packet_size: int = 1048576
    receive_maximum: int = 100
    max_inflight_messages: int = 100
    topic_alias_maximum: int = 10
    retain_available: bool = True
    max_qos: int = 2
    server_keep_alive: int = 0
    max_keep_alive: int = 65535
    max_session_expiry: int = 604800
    max_connections: int = 10000
    publish_rate: float = 0.0
    publish_burst: int = 0
    connect_timeout: float = 10.0


@dataclass(slots=True)
class Terms:
    """The accepted terms of one connection."""

    keep_alive: int
    session_expiry: int  # granted (may be lower than requested)
    send_quota: int  # how many QoS 1/2 deliveries may be unacknowledged at the client
    max_out_size: int  # the client's Maximum Packet Size
    alias_max_out: int  # the client's Topic Alias Maximum
    connack_properties: dict[str, Any] = field(default_factory=dict)


def negotiate(p: Connect, s: ConnectionSettings, assigned_id: str | None) -> Terms | int:
    """The terms for CONNECT ``p``, or the reason code to refuse it with."""
    v5 = p.protocol_level == MQTT_5
    props = p.properties
    ka = p.keep_alive
    announce_ka = False
    if s.server_keep_alive:
        ka, announce_ka = s.server_keep_alive, v5
    elif ka > s.max_keep_alive or (ka == 0 and s.max_keep_alive < 65535):
        if not v5:  # 3.1.1 cannot tell the client: refuse as Mosquitto does
            return rc.CLIENT_IDENTIFIER_NOT_VALID
        ka, announce_ka = s.max_keep_alive, True
    quota = min(65535, s.max_inflight_messages)
    if v5:
        requested = int(props.get("session_expiry_interval", 0))
        quota = min(quota, int(props.get("receive_maximum", 65535)))
        max_out = int(props.get("maximum_packet_size", 268_435_460))
        alias_max = int(props.get("topic_alias_maximum", 0))
    else:
        requested = 0 if p.clean_start else NEVER_EXPIRES
        max_out, alias_max = 268_435_460, 0
    granted = min(requested, s.max_session_expiry)
    ack: dict[str, Any] = {}
    if v5:
        if assigned_id is not None:
            ack["assigned_client_identifier"] = assigned_id
        if granted != requested:
            ack["session_expiry_interval"] = granted
        if announce_ka:
            ack["server_keep_alive"] = ka
        if s.receive_maximum != 65535:
            ack["receive_maximum"] = s.receive_maximum
        ack["maximum_packet_size"] = s.max_packet_size
        if s.topic_alias_maximum:
            ack["topic_alias_maximum"] = s.topic_alias_maximum
        if s.max_qos < 2:
            ack["maximum_qos"] = s.max_qos
        if not s.retain_available:
            ack["retain_available"] = 0
    return Terms(ka, granted, quota, max_out, alias_max, ack)
