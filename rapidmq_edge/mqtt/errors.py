"""Errors raised by the sans-I/O MQTT layer; each carries the MQTT 5 reason code to send."""

from __future__ import annotations


class MqttError(Exception):
    """A protocol failure that ends the connection; ``reason_code`` goes in DISCONNECT."""

    reason_code = 0x80


class MalformedPacket(MqttError):
    """The bytes do not form a valid packet (reason 0x81)."""

    reason_code = 0x81


class ProtocolError(MqttError):
    """A well-formed packet that breaks the protocol's rules (reason 0x82)."""

    reason_code = 0x82


class PacketTooLarge(MqttError):
    """A packet larger than the receiver's Maximum Packet Size (reason 0x95)."""

    reason_code = 0x95


class UnsupportedProtocolVersion(MqttError):
    """CONNECT names a protocol level other than 3, 4 or 5 (CONNACK 0x01 / 0x84)."""

    reason_code = 0x84
