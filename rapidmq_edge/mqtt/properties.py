"""MQTT 5.0 properties (OASIS MQTT 5.0, section 2.2.2): encoding, decoding, validation.

Properties are plain dicts keyed by snake_case names. ``user_property`` is a list of
(key, value) pairs and ``subscription_identifier`` a list of ints; every other
property is a scalar that may appear at most once.
"""

from __future__ import annotations

import struct
from typing import Any

from .errors import MalformedPacket, ProtocolError

Properties = dict[str, Any]

BYTE, INT16, INT32, VARINT, UTF8, BINARY, PAIR = range(7)

#: id -> (name, type)
PROPERTY_TYPES: dict[int, tuple[str, int]] = {
    0x01: ("payload_format_indicator", BYTE),
    0x02: ("message_expiry_interval", INT32),
    0x03: ("content_type", UTF8),
    0x08: ("response_topic", UTF8),
    0x09: ("correlation_data", BINARY),
    0x0B: ("subscription_identifier", VARINT),
    0x11: ("session_expiry_interval", INT32),
    0x12: ("assigned_client_identifier", UTF8),
    0x13: ("server_keep_alive", INT16),
    0x15: ("authentication_method", UTF8),
    0x16: ("authentication_data", BINARY),
    0x17: ("request_problem_information", BYTE),
    0x18: ("will_delay_interval", INT32),
    0x19: ("request_response_information", BYTE),
    0x1A: ("response_information", UTF8),
    0x1C: ("server_reference", UTF8),
    0x1F: ("reason_string", UTF8),
    0x21: ("receive_maximum", INT16),
    0x22: ("topic_alias_maximum", INT16),
    0x23: ("topic_alias", INT16),
    0x24: ("maximum_qos", BYTE),
    0x25: ("retain_available", BYTE),
    0x26: ("user_property", PAIR),
    0x27: ("maximum_packet_size", INT32),
    0x28: ("wildcard_subscription_available", BYTE),
    0x29: ("subscription_identifier_available", BYTE),
    0x2A: ("shared_subscription_available", BYTE),
}
PROPERTY_IDS: dict[str, tuple[int, int]] = {
    name: (pid, ptype) for pid, (name, ptype) in PROPERTY_TYPES.items()
}

_PUBLISH = {0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26}
_WILL = {0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26}
_REASON = {0x1F, 0x26}
#: packet type -> property ids allowed in it ("will" is the Will Properties block)
ALLOWED: dict[int | str, set[int]] = {
    1: {0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27},
    2: {0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27,
        0x28, 0x29, 0x2A},
    3: _PUBLISH,
    4: _REASON, 5: _REASON, 6: _REASON, 7: _REASON,
    8: {0x0B, 0x26},
    9: _REASON,
    10: {0x26},
    11: _REASON,
    14: {0x11, 0x1C, 0x1F, 0x26},
    15: {0x15, 0x16, 0x1F, 0x26},
    "will": _WILL,
}
_MULTI = {0x26, 0x0B}
# Byte properties whose only legal values are 0 and 1.
_BOOLEAN = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
# Two/four byte properties for which zero is a protocol error.
_NONZERO = {0x21, 0x23, 0x27}

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def decode_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a Variable Byte Integer at ``pos``; return (value, new position)."""
    value = 0
    shift = 0
    for _ in range(4):
        if pos >= end:
            raise MalformedPacket("variable byte integer runs past the packet")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if not byte and shift:
                raise MalformedPacket("variable byte integer not minimally encoded")
            return value, pos
        shift += 7
    raise MalformedPacket("variable byte integer longer than 4 bytes")


def encode_varint(value: int) -> bytes:
    """Encode a Variable Byte Integer (0..268,435,455)."""
    if value < 0x80:
        if value < 0:
            raise ValueError("variable byte integer must not be negative")
        return bytes((value,))
    if value > 268_435_455:
        raise ValueError(f"{value} does not fit in a variable byte integer")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_utf8(buf: bytes | memoryview, pos: int, end: int) -> tuple[str, int]:
    """Decode a length-prefixed UTF-8 string, rejecting NUL and ill-formed UTF-8."""
    raw, pos = decode_binary(buf, pos, end)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("ill-formed UTF-8 string") from None
    if "\x00" in text:
        raise MalformedPacket("UTF-8 string contains U+0000")
    return text, pos


def decode_binary(buf: bytes | memoryview, pos: int, end: int) -> tuple[bytes, int]:
    """Decode length-prefixed binary data."""
    if pos + 2 > end:
        raise MalformedPacket("length prefix runs past the packet")
    n = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + n > end:
        raise MalformedPacket("string runs past the packet")
    return bytes(buf[pos:pos + n]), pos + n


def encode_utf8(text: str) -> bytes:
    """Length-prefixed UTF-8 string."""
    raw = text.encode()
    return _U16.pack(len(raw)) + raw


def encode_binary(data: bytes) -> bytes:
    """Length-prefixed binary data."""
    return _U16.pack(len(data)) + data


def decode_properties(
    buf: bytes | memoryview, pos: int, end: int, packet_type: int | str
) -> tuple[Properties, int]:
    """Decode a property block at ``pos`` for ``packet_type``; return (props, new pos)."""
    length, pos = decode_varint(buf, pos, end)
    stop = pos + length
    if stop > end:
        raise MalformedPacket("properties run past the packet")
    props: Properties = {}
    if not length:
        return props, pos
    allowed = ALLOWED[packet_type]
    while pos < stop:
        pid, pos = decode_varint(buf, pos, stop)
        entry = PROPERTY_TYPES.get(pid)
        if entry is None or pid not in allowed:
            raise MalformedPacket(f"property 0x{pid:02x} not allowed in this packet")
        name, ptype = entry
        value: Any
        if ptype == BYTE:
            if pos >= stop:
                raise MalformedPacket("property runs past its block")
            value = buf[pos]
            pos += 1
        elif ptype == INT16:
            if pos + 2 > stop:
                raise MalformedPacket("property runs past its block")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif ptype == INT32:
            if pos + 4 > stop:
                raise MalformedPacket("property runs past its block")
            value = _U32.unpack_from(buf, pos)[0]
            pos += 4
        elif ptype == VARINT:
            value, pos = decode_varint(buf, pos, stop)
        elif ptype == UTF8:
            value, pos = decode_utf8(buf, pos, stop)
        elif ptype == BINARY:
            value, pos = decode_binary(buf, pos, stop)
        else:
            k, pos = decode_utf8(buf, pos, stop)
            v, pos = decode_utf8(buf, pos, stop)
            value = (k, v)
        if pid in _BOOLEAN and value > 1:
            raise ProtocolError(f"{name} must be 0 or 1")
        if pid in _NONZERO and value == 0:
            raise ProtocolError(f"{name} must not be 0")
        if pid == 0x0B and not 1 <= value <= 268_435_455:
            raise ProtocolError("subscription identifier out of range")
        if pid in _MULTI:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise ProtocolError(f"{name} appears twice")
        else:
            props[name] = value
    if pos != stop:
        raise MalformedPacket("property block length mismatch")
    return props, pos


def encode_properties(props: Properties | None) -> bytes:
    """Encode a property block (length prefix included)."""
    if not props:
        return b"\x00"
    out = bytearray()
    for name, value in props.items():
        if value is None:
            continue
        pid, ptype = PROPERTY_IDS[name]
        values = value if name in ("user_property", "subscription_identifier") else (value,)
        for v in values:
            out.append(pid)
            if ptype == BYTE:
                out.append(int(v))
            elif ptype == INT16:
                out += _U16.pack(v)
            elif ptype == INT32:
                out += _U32.pack(v)
            elif ptype == VARINT:
                out += encode_varint(v)
            elif ptype == UTF8:
                out += encode_utf8(v)
            elif ptype == BINARY:
                out += encode_binary(v)
            else:
                out += encode_utf8(v[0]) + encode_utf8(v[1])
    return encode_varint(len(out)) + bytes(out)
