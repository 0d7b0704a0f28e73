"""Malformed and protocol-violating MQTT byte strings, drawn from the OASIS specifications.

``CORPUS`` holds ``(name, version, data, needs_server)`` tuples:

* ``version`` is the protocol level the client claimed in a valid CONNECT sent first
  (4 = MQTT 3.1.1, 5 = MQTT 5.0); ``data`` is what it sends next. ``version`` 0 marks a
  case whose ``data`` is the whole byte string from the start of the connection (a bad
  CONNECT, or a first packet that is not CONNECT); :func:`claimed_level` tells which
  protocol level such a CONNECT names.
* ``needs_server`` is True when the violation can only be seen with connection state
  (topic aliases, the direction of a packet, the session expiry given in CONNECT, an
  authentication exchange) and a bare decoder accepts the bytes.

Every case must make a server close the connection; before closing, a 5.0 server sends a
DISCONNECT with a reason code >= 0x80 (or a CONNACK >= 0x80 for a bad CONNECT).

The bytes are built by hand here, independently of ``rapidmq_edge.mqtt``.
"""

from __future__ import annotations

import struct

__all__ = ["CORPUS", "claimed_level", "connect_bytes"]

V311 = 4
V5 = 5

# --------------------------------------------------------------------------- byte builders


def vbi(n: int) -> bytes:
    """Variable Byte Integer (no range check: some cases need out-of-range encodings)."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def s(text: str | bytes) -> bytes:
    """Two-byte length prefix + the bytes (a ``str`` is UTF-8 encoded)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def frame(first: int, body: bytes) -> bytes:
    """Fixed header (first byte + minimal Remaining Length) + body."""
    return bytes((first,)) + vbi(len(body)) + body


def props(*items: bytes) -> bytes:
    """A property block: length + the concatenated properties."""
    raw = b"".join(items)
    return vbi(len(raw)) + raw


def p_byte(pid: int, v: int) -> bytes:
    return bytes((pid, v))


def p_u16(pid: int, v: int) -> bytes:
    return bytes((pid,)) + u16(v)


def p_u32(pid: int, v: int) -> bytes:
    return bytes((pid,)) + u32(v)


def p_str(pid: int, v: str | bytes) -> bytes:
    return bytes((pid,)) + s(v)


def p_vbi(pid: int, v: int) -> bytes:
    return bytes((pid,)) + vbi(v)


def p_pair(k: str | bytes, v: str | bytes) -> bytes:
    return b"\x26" + s(k) + s(v)


def connect_raw(
    level: int,
    flags: int,
    payload: bytes,
    vh_props: bytes | None = None,
    name: str | bytes = "MQTT",
    keep_alive: int = 60,
    first: int = 0x10,
) -> bytes:
    """A CONNECT with exactly the given fields (properties only for level 5)."""
    if vh_props is None:
        vh_props = b"\x00" if level == V5 else b""
    body = s(name) + bytes((level, flags)) + u16(keep_alive) + vh_props + payload
    return frame(first, body)


def connect_bytes(version: int, client_id: str = "c", keep_alive: int = 60) -> bytes:
    """A valid clean-start CONNECT (3 = MQIsdp 3.1, 4 = 3.1.1, 5 = 5.0), no properties."""
    name = "MQIsdp" if version == 3 else "MQTT"
    return connect_raw(version, 0x02, s(client_id), name=name, keep_alive=keep_alive)


def claimed_level(data: bytes) -> int:
    """The protocol level a version-0 case's CONNECT names: 5, 4, or 0 when none."""
    if b"\x00\x04MQTT\x05" in data[:16]:
        return V5
    if data[:1] == b"\x10" or b"\x00\x04MQTT" in data[:16] or b"MQIsdp" in data[:16]:
        return V311
    return 0


# --------------------------------------------------------------------------- the corpus

CORPUS: list[tuple[str, int, bytes, bool]] = []


def _add(name: str, version: int, data: bytes, needs_server: bool = False) -> None:
    assert all(n != name for n, *_ in CORPUS), f"duplicate case name {name}"
    CORPUS.append((name, version, data, needs_server))


def _common(v: int) -> None:
    """Cases meaningful for both 3.1.1 and 5.0 (``E`` is an empty property block in 5.0)."""
    tag = "v5" if v == V5 else "v311"
    E = b"\x00" if v == V5 else b""

    def add(name: str, data: bytes, needs_server: bool = False) -> None:
        _add(f"{tag}: {name}", v, data, needs_server)

    def pub(first: int, topic: str | bytes, tail: bytes = b"") -> bytes:
        return frame(first, s(topic) + tail)

    ok_pub = frame(0x30, s("ok") + E + b"x")

    # Reserved packet types [MQTT-2.2.1] / 5.0 2.1.2
    add("reserved packet type 0", b"\x00\x00")
    add("reserved packet type 0 with a body", b"\x00\x02\x00\x01")
    if v == V311:
        add("packet type 15 (reserved in 3.1.1)", b"\xf0\x00")
        add("packet type 15 with a body", b"\xf0\x02\x00\x00")
    # PUBLISH fixed header [MQTT-3.3.1-4], [MQTT-3.3.1-2]
    add("PUBLISH QoS 3", pub(0x36, "a/b", b"\x00\x01" + E + b"x"))
    add("PUBLISH QoS 3 with retain", pub(0x37, "a/b", b"\x00\x01" + E + b"x"))
    add("PUBLISH QoS 3 with DUP", pub(0x3E, "a/b", b"\x00\x01" + E + b"x"))
    add("PUBLISH DUP with QoS 0", pub(0x38, "a/b", E + b"x"))
    # Packet identifiers are non-zero [MQTT-2.3.1-1]
    add("PUBLISH QoS 1 packet id 0", pub(0x32, "a", b"\x00\x00" + E + b"x"))
    add("PUBLISH QoS 2 packet id 0", pub(0x34, "a", b"\x00\x00" + E + b"x"))
    add("PUBLISH QoS 1 without packet id", pub(0x32, "a"))
    add("PUBLISH QoS 2 with half a packet id", pub(0x34, "a", b"\x00"))
    # Topic names: no wildcards [MQTT-3.3.2-2], well-formed UTF-8 [MQTT-1.5.3-1], no
    # U+0000 [MQTT-1.5.3-2]
    add("PUBLISH topic with +", pub(0x30, "a/+/b", E))
    add("PUBLISH topic with #", pub(0x30, "a/#", E))
    add("PUBLISH topic #", pub(0x30, "#", E))
    add("PUBLISH topic +", pub(0x32, "+", b"\x00\x07" + E))
    add("PUBLISH topic with U+0000", pub(0x30, b"a\x00b", E))
    add("PUBLISH topic ill-formed UTF-8 0xFF", pub(0x30, b"a\xffb", E))
    add("PUBLISH topic UTF-8 encoded surrogate", pub(0x30, b"a\xed\xa0\x80", E))
    add("PUBLISH topic overlong UTF-8", pub(0x30, b"\xc0\xaf", E))
    add("PUBLISH topic truncated UTF-8 sequence", pub(0x30, b"a\xe2\x82", E))
    add("PUBLISH topic lone continuation byte", pub(0x30, b"\x80abc", E))
    add("PUBLISH topic length runs past the packet", frame(0x30, b"\x00\x10abc"))
    add("PUBLISH body of 1 byte", frame(0x30, b"\x00"))
    add("PUBLISH empty body", b"\x30\x00")
    add("PUBLISH empty topic", pub(0x30, "", E + b"payload"))
    # Acknowledgements: flags [MQTT-2.2.2-1], packet id, length
    add("PUBACK flags 0010", frame(0x42, b"\x00\x01"))
    add("PUBACK packet id 0", frame(0x40, b"\x00\x00"))
    add("PUBACK body of 1 byte", frame(0x40, b"\x01"))
    add("PUBACK empty body", b"\x40\x00")
    add("PUBREC flags 0010", frame(0x52, b"\x00\x01"))
    add("PUBREC packet id 0", frame(0x50, b"\x00\x00"))
    add("PUBREL flags 0000", frame(0x60, b"\x00\x01"))
    add("PUBREL flags 0011", frame(0x63, b"\x00\x01"))
    add("PUBREL flags 1010", frame(0x6A, b"\x00\x01"))
    add("PUBREL packet id 0", frame(0x62, b"\x00\x00"))
    add("PUBCOMP flags 1000", frame(0x78, b"\x00\x01"))
    add("PUBCOMP packet id 0", frame(0x70, b"\x00\x00"))
    if v == V311:
        add("PUBACK body of 3 bytes", frame(0x40, b"\x00\x01\x00"))
        add("PUBREC body of 4 bytes", frame(0x50, b"\x00\x01\x00\x00"))
        add("PUBREL body of 3 bytes", frame(0x62, b"\x00\x01\x00"))
        add("PUBCOMP body of 3 bytes", frame(0x70, b"\x00\x01\x10"))
    # SUBSCRIBE [MQTT-3.8.1-1], [MQTT-3.8.3-3], [MQTT-3-8.3-4] (3.1.1 reserved bits)
    sub_ok = s("a/b") + b"\x00"
    add("SUBSCRIBE flags 0000", frame(0x80, b"\x00\x01" + E + sub_ok))
    add("SUBSCRIBE flags 0011", frame(0x83, b"\x00\x01" + E + sub_ok))
    add("SUBSCRIBE flags 0110", frame(0x86, b"\x00\x01" + E + sub_ok))
    add("SUBSCRIBE without a topic filter", frame(0x82, b"\x00\x01" + E))
    add("SUBSCRIBE packet id 0", frame(0x82, b"\x00\x00" + E + sub_ok))
    add("SUBSCRIBE half a packet id", frame(0x82, b"\x00"))
    add("SUBSCRIBE QoS 3", frame(0x82, b"\x00\x01" + E + s("a") + b"\x03"))
    add("SUBSCRIBE second filter QoS 3",
        frame(0x82, b"\x00\x01" + E + s("a") + b"\x01" + s("b") + b"\x03"))
    add("SUBSCRIBE options byte missing", frame(0x82, b"\x00\x01" + E + s("a")))
    add("SUBSCRIBE options byte missing after a good filter",
        frame(0x82, b"\x00\x01" + E + sub_ok + s("c")))
    add("SUBSCRIBE filter with U+0000", frame(0x82, b"\x00\x01" + E + s(b"a\x00") + b"\x00"))
    add("SUBSCRIBE filter ill-formed UTF-8", frame(0x82, b"\x00\x01" + E + s(b"\xfe") + b"\x00"))
    add("SUBSCRIBE filter length runs past the packet",
        frame(0x82, b"\x00\x01" + E + b"\x00\x09ab"))
    if v == V311:
        add("SUBSCRIBE reserved option bit 2", frame(0x82, b"\x00\x01" + s("a") + b"\x04"))
        add("SUBSCRIBE reserved option bits 7-2", frame(0x82, b"\x00\x01" + s("a") + b"\xfd"))
    # UNSUBSCRIBE [MQTT-3.10.1-1], [MQTT-3.10.3-2]
    add("UNSUBSCRIBE flags 0000", frame(0xA0, b"\x00\x01" + E + s("a")))
    add("UNSUBSCRIBE flags 0001", frame(0xA1, b"\x00\x01" + E + s("a")))
    add("UNSUBSCRIBE without a topic filter", frame(0xA2, b"\x00\x01" + E))
    add("UNSUBSCRIBE packet id 0", frame(0xA2, b"\x00\x00" + E + s("a")))
    add("UNSUBSCRIBE filter ill-formed UTF-8", frame(0xA2, b"\x00\x01" + E + s(b"a\xc3")))
    add("UNSUBSCRIBE filter with U+0000", frame(0xA2, b"\x00\x01" + E + s(b"\x00")))
    add("UNSUBSCRIBE filter length runs past the packet",
        frame(0xA2, b"\x00\x01" + E + b"\x00\x05a"))
    # PINGREQ / DISCONNECT
    add("PINGREQ with a body", frame(0xC0, b"\x00"))
    add("PINGREQ flags 0001", b"\xc1\x00")
    add("PINGREQ flags 1000", b"\xc8\x00")
    add("DISCONNECT flags 0001", b"\xe1\x00")
    add("DISCONNECT flags 0010", b"\xe2\x00")
    if v == V311:
        add("DISCONNECT with a body", frame(0xE0, b"\x00"))
        add("DISCONNECT with a 2 byte body", frame(0xE0, b"\x00\x00"))
    # A second CONNECT is a protocol violation [MQTT-3.1.0-2]
    add("second CONNECT", connect_bytes(v, "again"))
    add("second CONNECT naming the other version", connect_bytes(9 - v, "again"))
    add("second CONNECT with bad flags", connect_raw(v, 0x02, s("x"), first=0x12))
    # Remaining Length: at most 4 bytes [MQTT-1.5.5], Maximum Packet Size (server: 1 MiB)
    add("remaining length of 5 bytes", b"\x30\xff\xff\xff\xff\x7f")
    add("remaining length of 5 bytes on PINGREQ", b"\xc0\x80\x80\x80\x80\x00")
    add("remaining length above the maximum packet size", b"\x30" + vbi(2_000_000) + s("a"))
    add("remaining length 268435455", b"\x30\xff\xff\xff\x7f")
    add("SUBSCRIBE above the maximum packet size", b"\x82" + vbi(1_048_577) + b"\x00\x01")
    # A good packet, then a bad one in the same segment
    add("good PUBLISH then reserved type 0", ok_pub + b"\x00\x00")
    add("good PUBLISH then PUBLISH QoS 3", ok_pub + pub(0x36, "a", b"\x00\x01" + E))
    add("two good PUBLISHes then SUBSCRIBE without filter",
        ok_pub + ok_pub + frame(0x82, b"\x00\x01" + E))
    # Server-to-client packets sent by a client: decodable, refused with state
    add("CONNACK sent by a client", frame(0x20, b"\x00\x00" + E), needs_server=True)
    add("SUBACK sent by a client", frame(0x90, b"\x00\x01" + E + b"\x00"), needs_server=True)
    add("UNSUBACK sent by a client",
        frame(0xB0, b"\x00\x01" + (E + b"\x00" if v == V5 else b"")), needs_server=True)
    add("PINGRESP sent by a client", b"\xd0\x00", needs_server=True)
    add("CONNACK flags 0001", frame(0x21, b"\x00\x00" + E))
    add("CONNACK reserved acknowledge flags", frame(0x20, b"\x02\x00" + E))
    add("SUBACK flags 0010", frame(0x92, b"\x00\x01" + E + b"\x00"))
    add("UNSUBACK packet id 0", frame(0xB0, b"\x00\x00" + E + (b"\x00" if v == V5 else b"")))
    add("PINGRESP with a body", frame(0xD0, b"\x00"))


def _v5_only() -> None:
    def add(name: str, data: bytes, needs_server: bool = False) -> None:
        _add(f"v5: {name}", V5, data, needs_server)

    def pub(p: bytes, topic: str | bytes = "a/b", first: int = 0x30, tail: bytes = b"x") -> bytes:
        pid = b"\x00\x01" if first & 0x06 else b""
        return frame(first, s(topic) + pid + p + tail)

    # AUTH (type 15): flags, property rules [MQTT-3.15.1-1], 2.2.2.2
    add("AUTH flags 0001", b"\xf1\x00")
    add("AUTH flags 0010 with a body", frame(0xF2, b"\x18" + props(p_str(0x15, "x"))))
    add("AUTH properties run past the packet", frame(0xF0, b"\x18\x0a\x15\x00\x01"))
    add("AUTH property not allowed (topic alias)", frame(0xF0, b"\x18" + props(p_u16(0x23, 1))))
    add("AUTH bytes after the properties", frame(0xF0, b"\x00\x00\xff"))
    add("AUTH duplicated authentication method",
        frame(0xF0, b"\x18" + props(p_str(0x15, "x"), p_str(0x15, "y"))))
    add("AUTH authentication method ill-formed UTF-8",
        frame(0xF0, b"\x18" + props(p_str(0x15, b"\xff\xfe"))))
    add("AUTH without an authentication exchange",
        frame(0xF0, b"\x18" + props(p_str(0x15, "SCRAM-SHA-1"))), needs_server=True)
    # PUBLISH properties (3.3.2.3)
    add("PUBLISH property not allowed (session expiry)", pub(props(p_u32(0x11, 5))))
    add("PUBLISH property not allowed (receive maximum)", pub(props(p_u16(0x21, 5))))
    add("PUBLISH property not allowed (reason string)", pub(props(p_str(0x1F, "r"))))
    add("PUBLISH unknown property 0x7F", pub(props(b"\x7f\x00")))
    add("PUBLISH unknown property 0x00", pub(props(b"\x00\x00")))
    add("PUBLISH duplicated message expiry interval",
        pub(props(p_u32(0x02, 5), p_u32(0x02, 6))))
    add("PUBLISH duplicated content type", pub(props(p_str(0x03, "a"), p_str(0x03, "b"))))
    add("PUBLISH duplicated topic alias",
        pub(props(p_u16(0x23, 1), p_u16(0x23, 2)), topic="t"))
    add("PUBLISH payload format indicator 2", pub(props(p_byte(0x01, 2))))
    add("PUBLISH payload format indicator 255", pub(props(p_byte(0x01, 255))))
    add("PUBLISH topic alias 0", pub(props(p_u16(0x23, 0))))
    add("PUBLISH topic alias 0 with empty topic", pub(props(p_u16(0x23, 0)), topic=""))
    add("PUBLISH empty topic without topic alias", pub(b"\x00", topic=""))
    add("PUBLISH QoS 1 empty topic without topic alias", pub(b"\x00", topic="", first=0x32))
    add("PUBLISH subscription identifier from a client", pub(props(p_vbi(0x0B, 3))))
    add("PUBLISH subscription identifier 0", pub(props(p_vbi(0x0B, 0))))
    add("PUBLISH response topic with wildcard", pub(props(p_str(0x08, "reply/#"))))
    add("PUBLISH empty response topic", pub(props(p_str(0x08, ""))))
    add("PUBLISH properties length runs past the packet", frame(0x30, s("a") + b"\x09\x01"))
    add("PUBLISH properties length of 5 bytes", frame(0x30, s("a") + b"\xff\xff\xff\xff\x7f"))
    add("PUBLISH QoS 1 without properties length", frame(0x32, s("a") + b"\x00\x01"))
    add("PUBLISH truncated message expiry interval", pub(b"\x03\x02\x00\x00"))
    add("PUBLISH truncated topic alias", pub(b"\x02\x23\x00"))
    add("PUBLISH content type ill-formed UTF-8", pub(props(p_str(0x03, b"\xff"))))
    add("PUBLISH content type with U+0000", pub(props(p_str(0x03, b"te\x00xt"))))
    add("PUBLISH user property key with U+0000", pub(props(p_pair(b"k\x00", "v"))))
    add("PUBLISH user property value ill-formed UTF-8", pub(props(p_pair("k", b"\xc0\x80"))))
    add("PUBLISH user property value missing", pub(props(b"\x26" + s("k"))))
    add("PUBLISH correlation data runs past the block", pub(b"\x04\x09\x00\x05a"))
    add("PUBLISH property id not minimally encoded", pub(props(b"\x81\x00\x01")))
    add("PUBLISH subscription-id-sized property id", pub(props(b"\x80\x80\x80\x80\x01")))
    add("PUBLISH remaining length not minimally encoded",
        b"\x30\x85\x00" + s("a") + b"\x00" + b"x")
    add("PUBLISH remaining length 0 in 2 bytes", b"\x30\x80\x00")
    # Session-state violations
    add("PUBLISH topic alias 11 (above the maximum 10)",
        pub(props(p_u16(0x23, 11)), topic="t"), needs_server=True)
    add("PUBLISH topic alias 65535", pub(props(p_u16(0x23, 65535)), topic="t"),
        needs_server=True)
    add("PUBLISH empty topic with unknown topic alias", pub(props(p_u16(0x23, 5)), topic=""),
        needs_server=True)
    add("PUBLISH QoS 1 empty topic with unknown topic alias",
        pub(props(p_u16(0x23, 3)), topic="", first=0x32), needs_server=True)
    add("PUBLISH empty topic with alias above the maximum",
        pub(props(p_u16(0x23, 11)), topic=""), needs_server=True)
    # Acknowledgements with properties (3.4.2.2)
    add("PUBACK properties run past the packet", frame(0x40, b"\x00\x01\x00\x05\x1f"))
    add("PUBACK property not allowed (topic alias)",
        frame(0x40, b"\x00\x01\x00" + props(p_u16(0x23, 1))))
    add("PUBACK duplicated reason string",
        frame(0x40, b"\x00\x01\x80" + props(p_str(0x1F, "a"), p_str(0x1F, "b"))))
    add("PUBREC property not allowed (content type)",
        frame(0x50, b"\x00\x01\x00" + props(p_str(0x03, "a"))))
    add("PUBREL bytes after the properties", frame(0x62, b"\x00\x01\x00\x00\xaa"))
    add("PUBCOMP reason string ill-formed UTF-8",
        frame(0x70, b"\x00\x01\x00" + props(p_str(0x1F, b"\xff"))))
    # SUBSCRIBE (3.8.3.1): reserved bits [MQTT-3.8.3-5], retain handling 3, sub ids
    sub = b"\x00\x01"
    add("SUBSCRIBE reserved option bit 6", frame(0x82, sub + b"\x00" + s("a") + b"\x40"))
    add("SUBSCRIBE reserved option bit 7", frame(0x82, sub + b"\x00" + s("a") + b"\x80"))
    add("SUBSCRIBE retain handling 3", frame(0x82, sub + b"\x00" + s("a") + b"\x30"))
    add("SUBSCRIBE second filter retain handling 3",
        frame(0x82, sub + b"\x00" + s("a") + b"\x00" + s("b") + b"\x31"))
    add("SUBSCRIBE subscription identifier 0",
        frame(0x82, sub + props(p_vbi(0x0B, 0)) + s("a") + b"\x00"))
    add("SUBSCRIBE two subscription identifiers",
        frame(0x82, sub + props(p_vbi(0x0B, 1), p_vbi(0x0B, 2)) + s("a") + b"\x00"))
    add("SUBSCRIBE property not allowed (topic alias)",
        frame(0x82, sub + props(p_u16(0x23, 1)) + s("a") + b"\x00"))
    add("SUBSCRIBE properties run past the packet", frame(0x82, sub + b"\x08\x0b\x01"))
    add("SUBSCRIBE no local on a shared subscription",
        frame(0x82, sub + b"\x00" + s("$share/g/a") + b"\x04"))
    # UNSUBSCRIBE (3.10.2.1) / DISCONNECT (3.14.2.2)
    add("UNSUBSCRIBE property not allowed (subscription identifier)",
        frame(0xA2, sub + props(p_vbi(0x0B, 1)) + s("a")))
    add("UNSUBSCRIBE properties run past the packet", frame(0xA2, sub + b"\x07\x26"))
    add("DISCONNECT properties run past the packet", frame(0xE0, b"\x00\x05\x1f\x00"))
    add("DISCONNECT property not allowed (topic alias)",
        frame(0xE0, b"\x00" + props(p_u16(0x23, 1))))
    add("DISCONNECT property not allowed (server keep alive)",
        frame(0xE0, b"\x00" + props(p_u16(0x13, 1))))
    add("DISCONNECT duplicated reason string",
        frame(0xE0, b"\x00" + props(p_str(0x1F, "a"), p_str(0x1F, "b"))))
    add("DISCONNECT duplicated session expiry interval",
        frame(0xE0, b"\x00" + props(p_u32(0x11, 0), p_u32(0x11, 0))))
    add("DISCONNECT bytes after the properties", frame(0xE0, b"\x00\x00\x00"))
    add("DISCONNECT session expiry set after 0 in CONNECT [MQTT-3.14.2-2]",
        frame(0xE0, b"\x00" + props(p_u32(0x11, 60))), needs_server=True)


def _connect_cases(level: int) -> None:
    """Malformed CONNECT packets naming protocol level 4 or 5 (whole connection bytes)."""
    tag = "CONNECT v5" if level == V5 else "CONNECT v311"
    WP = b"\x00" if level == V5 else b""  # empty Will properties

    def add(name: str, data: bytes, needs_server: bool = False) -> None:
        _add(f"{tag}: {name}", 0, data, needs_server)

    will = WP + s("will/t") + s(b"bye")
    add("reserved flag set [MQTT-3.1.2-3]", connect_raw(level, 0x03, s("c")))
    add("reserved flag without clean session", connect_raw(level, 0x01, s("c")))
    add("Will QoS 3 [MQTT-3.1.2-14]", connect_raw(level, 0x1E, s("c") + will))
    add("Will QoS 1 without Will flag [MQTT-3.1.2-13]", connect_raw(level, 0x0A, s("c")))
    add("Will QoS 2 without Will flag", connect_raw(level, 0x12, s("c")))
    add("Will retain without Will flag [MQTT-3.1.2-15]", connect_raw(level, 0x22, s("c")))
    add("fixed header flags 0001", connect_raw(level, 0x02, s("c"), first=0x11))
    add("fixed header flags 1000", connect_raw(level, 0x02, s("c"), first=0x18))
    add("bytes after the payload", connect_raw(level, 0x02, s("c") + b"\x00"))
    add("client id ill-formed UTF-8", connect_raw(level, 0x02, s(b"c\xff")))
    add("client id with U+0000", connect_raw(level, 0x02, s(b"c\x00d")))
    add("client id length runs past the packet", connect_raw(level, 0x02, b"\x00\x08abc"))
    add("client id missing", connect_raw(level, 0x02, b""))
    add("Will topic with wildcard", connect_raw(level, 0x06, s("c") + WP + s("a/+") + s(b"x")))
    add("empty Will topic", connect_raw(level, 0x06, s("c") + WP + s("") + s(b"x")))
    add("Will topic ill-formed UTF-8",
        connect_raw(level, 0x06, s("c") + WP + s(b"\xed\xb0\x80") + s(b"x")))
    add("Will payload missing", connect_raw(level, 0x06, s("c") + WP + s("w")))
    add("user name flag without user name", connect_raw(level, 0x82, s("c")))
    add("password flag without password", connect_raw(level, 0xC2, s("c") + s("u")))
    add("user name ill-formed UTF-8", connect_raw(level, 0x82, s("c") + s(b"\xff")))
    add("truncated variable header",
        frame(0x10, s("MQTT") + bytes((level,)) + b"\x02"))
    add("remaining length of 5 bytes",
        b"\x10\x80\x80\x80\x80\x01" + s("MQTT") + bytes((level,)))
    add("above the maximum packet size",
        b"\x10" + vbi(1_048_600) + s("MQTT") + bytes((level, 0x02)))
    add("protocol name lower case", connect_raw(level, 0x02, s("c"), name="mqtt"))
    if level == V311:
        add("remaining length 0", b"\x10\x00")
        add("protocol name truncated", frame(0x10, b"\x00\x04MQ"))
        add("password without user name [MQTT-3.1.2-22]",
            connect_raw(level, 0x42, s("c") + s(b"pw")))
        add("unknown protocol name MQTX", connect_raw(level, 0x02, s("c"), name="MQTX"))
        add("protocol name MQIsdp with level 4", connect_raw(4, 0x02, s("c"), name="MQIsdp"))
        add("MQIsdp password without user name",
            connect_raw(3, 0x42, s("c") + s(b"pw"), name="MQIsdp"))
        add("unsupported protocol level 3 with MQTT", connect_raw(3, 0x02, s("c")))
        add("unsupported protocol level 6", connect_raw(6, 0x02, s("c")))
        add("unsupported protocol level 0", connect_raw(0, 0x02, s("c")))
        add("protocol name ill-formed UTF-8", connect_raw(level, 0x02, s("c"), name=b"MQ\xffT"))
        add("empty client id without clean session [MQTT-3.1.3-8]",
            connect_raw(level, 0x00, s("")), needs_server=True)
        return
    P = props
    add("receive maximum 0", connect_raw(level, 0x02, s("c"), P(p_u16(0x21, 0))))
    add("maximum packet size 0", connect_raw(level, 0x02, s("c"), P(p_u32(0x27, 0))))
    add("request problem information 2", connect_raw(level, 0x02, s("c"), P(p_byte(0x17, 2))))
    add("request response information 2", connect_raw(level, 0x02, s("c"), P(p_byte(0x19, 2))))
    add("property not allowed (topic alias)", connect_raw(level, 0x02, s("c"), P(p_u16(0x23, 1))))
    add("property not allowed (will delay interval)",
        connect_raw(level, 0x02, s("c"), P(p_u32(0x18, 1))))
    add("property not allowed (payload format indicator)",
        connect_raw(level, 0x02, s("c"), P(p_byte(0x01, 0))))
    add("duplicated session expiry interval",
        connect_raw(level, 0x02, s("c"), P(p_u32(0x11, 1), p_u32(0x11, 2))))
    add("duplicated receive maximum",
        connect_raw(level, 0x02, s("c"), P(p_u16(0x21, 1), p_u16(0x21, 2))))
    add("authentication data without method",
        connect_raw(level, 0x02, s("c"), P(p_str(0x16, b"\x01\x02"))))
    add("properties length runs past the packet", connect_raw(level, 0x02, s("c"), b"\x20"))
    add("truncated properties length", connect_raw(level, 0x02, b"", b"\x80"))
    add("properties length of 5 bytes",
        connect_raw(level, 0x02, s("c"), b"\x80\x80\x80\x80\x00"))
    add("properties block missing", connect_raw(level, 0x02, s(""), b""))
    add("user property ill-formed UTF-8",
        connect_raw(level, 0x02, s("c"), P(p_pair("k", b"\xff"))))
    add("Will property not allowed (session expiry)",
        connect_raw(level, 0x06, s("c") + P(p_u32(0x11, 1)) + s("w") + s(b"x")))
    add("Will payload format indicator 2",
        connect_raw(level, 0x06, s("c") + P(p_byte(0x01, 2)) + s("w") + s(b"x")))
    add("Will properties run past the packet",
        connect_raw(level, 0x06, s("c") + b"\x30" + s("w") + s(b"x")))
    add("Will response topic with wildcard",
        connect_raw(level, 0x06, s("c") + P(p_str(0x08, "r/+")) + s("w") + s(b"x")))
    add("duplicated Will delay interval",
        connect_raw(level, 0x06, s("c") + P(p_u32(0x18, 1), p_u32(0x18, 1)) + s("w") + s(b"x")))
    add("Will subscription identifier",
        connect_raw(level, 0x06, s("c") + P(p_vbi(0x0B, 1)) + s("w") + s(b"x")))


def _not_connect_first() -> None:
    """The first packet on a connection must be CONNECT [MQTT-3.1.0-1]."""
    cases = {
        "PINGREQ": b"\xc0\x00",
        "PUBLISH QoS 0": frame(0x30, s("a/b") + b"x"),
        "PUBLISH QoS 1": frame(0x32, s("a/b") + b"\x00\x01x"),
        "SUBSCRIBE": frame(0x82, b"\x00\x01" + s("#") + b"\x00"),
        "UNSUBSCRIBE": frame(0xA2, b"\x00\x01" + s("#")),
        "PUBACK": frame(0x40, b"\x00\x01"),
        "PUBREL": frame(0x62, b"\x00\x01"),
        "DISCONNECT": b"\xe0\x00",
        "AUTH": frame(0xF0, b"\x00\x00"),
        "CONNACK": frame(0x20, b"\x00\x00"),
    }
    for name, data in cases.items():
        _add(f"first packet {name} instead of CONNECT", 0, data)


_common(V311)
_common(V5)
_v5_only()
_connect_cases(V311)
_connect_cases(V5)
_not_connect_first()
