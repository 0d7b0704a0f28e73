"""Sans-I/O MQTT 3.1.1 / 5.0 codec: bytes in, packets out; packets in, bytes out.

Decoding is strict: every rule of the specifications that can be checked on a single
packet is checked here, and a violation raises :class:`MalformedPacket` or
:class:`ProtocolError`. Nothing is ever read beyond a packet's Remaining Length.
"""

from __future__ import annotations

import struct

from .errors import MalformedPacket, PacketTooLarge, ProtocolError, UnsupportedProtocolVersion
from .framing import SCAN, TOPIC_SLOTS, Scan
from .packets import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MQTT_5,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    SubOptions,
    Subscribe,
    Unsuback,
    Unsubscribe,
    Will,
)
from .properties import (
    Properties,
    decode_binary,
    decode_properties,
    decode_utf8,
    encode_binary,
    encode_properties,
    encode_utf8,
    encode_varint,
)
from .topics import valid_topic_name

__all__ = ["PacketReader", "decode_packet", "encode", "encode_publish", "suback_bytes"]

_U16 = struct.Struct("!H")
_ACK_CLASSES: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp,
}
_PINGRESP_BYTES = b"\xd0\x00"
_PINGREQ_BYTES = b"\xc0\x00"
#: the C lane's topic cache, shared by every reader (a topic is a value: whoever published
#: it first, the same bytes give an equal str; an idle connection costs nothing)
_TOPICS: list[str | None] = [None] * TOPIC_SLOTS


class PacketReader:
    """Incremental framer and decoder for one direction of one connection.

    ``feed(data)`` returns the packets completed by ``data``. ``version`` starts unknown
    (the first packet of a server connection is CONNECT, which sets it) and may be set
    by the owner. A declared Remaining Length above ``max_packet_size`` raises
    :class:`PacketTooLarge` as soon as the fixed header is read.

    The optional C lane (:mod:`.framing`) decodes the frames it fully understands (also a
    first CONNECT, which sets the version) and hands every other frame to the Python code
    below: the same packets and errors either way. ``accelerated=False`` keeps to the
    Python code.
    """

    __slots__ = ("_buf", "max_packet_size", "version", "error", "_scan")

    def __init__(self, max_packet_size: int = 268_435_460, version: int = 0,
                 accelerated: bool = True) -> None:
        self._buf = bytearray()
        self.max_packet_size = max_packet_size
        self.version = version
        #: set when an error follows packets returned by the same ``feed`` call
        self.error: Exception | None = None
        self._scan: Scan | None = SCAN if accelerated else None

    def feed(self, data: bytes) -> list[Packet]:
        """Append ``data`` and return every complete packet now available.

        Raises the first decoding error; when good packets precede it in the same call,
        they are returned and the error is left in ``self.error`` instead.
        """
        if self.error is not None:
            raise self.error
        out: list[Packet] = []
        try:
            self._feed(data, out)
        except Exception as exc:
            if not out:
                raise
            self.error = exc
        return out

    def _feed(self, data: bytes, out: list[Packet]) -> None:
        buf = self._buf
        version = self.version
        max_size = self.max_packet_size
        scan = self._scan
        if scan is not None and version and not buf:
            # the common read: nothing left over from the last one, the C lane reads ``data``
            # itself; only what follows its last complete frame is kept
            pos = scan(data, 0, version, max_size, out, _TOPICS)
            if pos >= 0:
                if pos < len(data):
                    buf += data[pos:]
                return
            buf += data
            self._decode(~pos, out)
            return
        buf += data
        pos = 0
        if scan is not None:
            pos = scan(buf, 0, version, max_size, out, _TOPICS)
            if not version and out:  # the C lane read the CONNECT (and went on with its level)
                self.version = out[0].protocol_level  # type: ignore[union-attr]
            if pos >= 0:  # the C lane read every complete frame
                if pos:
                    del buf[:pos]
                return
            pos = ~pos
        self._decode(pos, out)

    def _decode(self, pos: int, out: list[Packet]) -> None:
        """Decode the buffer's frames from ``pos`` on (the C lane declined the frame there,
        or there is no C lane), then drop the bytes read."""
        buf = self._buf
        n = len(buf)
        version = self.version
        v5 = version == MQTT_5
        max_size = self.max_packet_size
        scan = self._scan
        handoff = True  # the frame at pos is for the Python code (the C lane declined it)
        view = memoryview(buf)  # one view per call; each packet's body is a slice of it
        try:
            while n - pos >= 2:
                if scan is not None and not handoff:
                    at = scan(buf, pos, version, max_size, out, _TOPICS)
                    if at >= 0:
                        pos = at
                        break
                    pos = ~at
                handoff = False
                first = buf[pos]
                byte = buf[pos + 1]
                if byte < 0x80:  # a 1-byte Remaining Length (packets below 128 bytes)
                    length = byte
                    i = pos + 2
                else:  # Fixed header: type/flags byte, then a 1-4 byte Remaining Length.
                    length = byte & 0x7F
                    shift = 7
                    i = pos + 2
                    complete = False
                    for _ in range(3):
                        if i >= n:
                            break
                        byte = buf[i]
                        i += 1
                        length |= (byte & 0x7F) << shift
                        if not byte & 0x80:
                            complete = True
                            break
                        shift += 7
                    else:
                        raise MalformedPacket("remaining length longer than 4 bytes")
                    if not complete:
                        break
                    if buf[i - 1] == 0 and version == MQTT_5:
                        raise MalformedPacket("remaining length not minimally encoded")
                total = i - pos + length
                if total > max_size:
                    raise PacketTooLarge(f"packet of {total} bytes exceeds maximum packet size")
                if n - pos < total:
                    break
                end = i + length
                body = view[i:end]
                try:
                    if first >> 4 == PUBLISH and version:  # the hot path: no dispatch
                        pub = _decode_publish(first & 0x0F, body, length, v5)
                        if not first & 0x0F:  # QoS 0, no retain: keep the bytes for forwarding
                            pub.raw = bytes(view[pos:end])
                        packet: Packet = pub
                    else:
                        packet = decode_packet(first, body, version)
                        if packet.type == CONNECT:
                            version = self.version = packet.protocol_level  # type: ignore[union-attr]
                            v5 = version == MQTT_5
                finally:
                    body.release()
                out.append(packet)
                pos = end
        finally:
            view.release()
        if pos:
            del buf[:pos]

    @property
    def buffered(self) -> int:
        """Bytes received but not yet forming a complete packet."""
        return len(self._buf)


def decode_packet(first: int, body: bytes | memoryview, version: int) -> Packet:
    """Decode one packet from its first byte and its body (the Remaining Length bytes)."""
    ptype = first >> 4
    flags = first & 0x0F
    end = len(body)
    v5 = version == MQTT_5
    if not version and ptype != CONNECT:
        raise ProtocolError("first packet must be CONNECT")
    if ptype == PUBLISH:
        return _decode_publish(flags, body, end, v5)
    if ptype in (PUBREL, SUBSCRIBE, UNSUBSCRIBE):
        if flags != 0x02:
            raise MalformedPacket(f"packet type {ptype} requires fixed header flags 0010")
    elif flags:
        raise MalformedPacket(f"packet type {ptype} requires fixed header flags 0000")
    if ptype in _ACK_CLASSES:
        return _decode_ack(ptype, body, end, v5)
    if ptype in (PINGREQ, PINGRESP):
        if end:
            raise MalformedPacket("PINGREQ/PINGRESP must have no body")
        return Pingreq() if ptype == PINGREQ else Pingresp()
    if ptype == CONNECT:
        if version:
            raise ProtocolError("second CONNECT on a connection")
        return _decode_connect(body, end)
    if ptype == SUBSCRIBE:
        return _decode_subscribe(body, end, v5)
    if ptype == UNSUBSCRIBE:
        return _decode_unsubscribe(body, end, v5)
    if ptype == DISCONNECT:
        return _decode_disconnect(body, end, v5)
    if ptype == AUTH:
        if not v5:
            raise MalformedPacket("AUTH does not exist before MQTT 5")
        return _decode_auth(body, end)
    if ptype == CONNACK:
        return _decode_connack(body, end, v5)
    if ptype == SUBACK:
        return _decode_suback(body, end, v5)
    if ptype == UNSUBACK:
        return _decode_unsuback(body, end, v5)
    raise MalformedPacket(f"reserved packet type {ptype}")


def _packet_id(body: bytes | memoryview, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise MalformedPacket("packet identifier missing")
    pid = (body[pos] << 8) | body[pos + 1]
    if not pid:
        raise MalformedPacket("packet identifier must not be 0")
    return pid


def _decode_publish(flags: int, body: bytes | memoryview, end: int, v5: bool) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")
    dup = bool(flags & 0x08)
    if dup and not qos:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
    if end < 2:
        raise MalformedPacket("PUBLISH too short")
    tlen = (body[0] << 8) | body[1]
    pos = 2 + tlen
    if pos > end:
        raise MalformedPacket("topic runs past the packet")
    try:
        topic = bytes(body[2:pos]).decode()
    except UnicodeDecodeError:
        raise MalformedPacket("topic is not UTF-8") from None
    if topic and ("+" in topic or "#" in topic or "\x00" in topic):
        raise MalformedPacket("topic name contains a wildcard or U+0000")
    pid = 0
    if qos:
        pid = _packet_id(body, pos, end)
        pos += 2
    props: Properties
    if v5:
        props, pos = decode_properties(body, pos, end, PUBLISH)
        if "subscription_identifier" in props:
            raise ProtocolError("PUBLISH from a client must not carry a subscription id")
        if not topic and "topic_alias" not in props:
            raise ProtocolError("empty topic without a topic alias")
        if "response_topic" in props and not valid_topic_name(props["response_topic"]):
            raise ProtocolError("invalid response topic")
    else:
        props = {}
        if not topic:
            raise MalformedPacket("empty topic name")
    return Publish(topic, bytes(body[pos:end]), qos, bool(flags & 0x01), dup, pid, props)


def _decode_ack(ptype: int, body: bytes | memoryview, end: int, v5: bool) -> Packet:
    pid = _packet_id(body, 0, end)
    reason = 0
    props: Properties = {}
    if v5:
        if end > 2:
            reason = body[2]
        if end > 3:
            props, pos = decode_properties(body, 3, end, ptype)
            if pos != end:
                raise MalformedPacket("bytes after the properties")
    elif end != 2:
        raise MalformedPacket("acknowledgement must have a 2 byte body")
    ack: Packet = _ACK_CLASSES[ptype](pid, reason, props)
    return ack


def _decode_connect(body: bytes | memoryview, end: int) -> Connect:
    name, pos = decode_utf8(body, 0, end)
    if pos + 4 > end:
        raise MalformedPacket("CONNECT variable header too short")
    level = body[pos]
    if name == "MQTT":
        if level not in (4, 5):
            raise UnsupportedProtocolVersion(f"protocol level {level}")
    elif name == "MQIsdp":
        if level != 3:
            raise UnsupportedProtocolVersion(f"protocol level {level}")
    else:
        raise MalformedPacket(f"unknown protocol name {name!r}")
    flags = body[pos + 1]
    keep_alive = _U16.unpack_from(body, pos + 2)[0]
    pos += 4
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")
    clean = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise MalformedPacket("Will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("Will QoS/Retain set without the Will flag")
    v5 = level == MQTT_5
    if has_password and not has_username and not v5:
        raise MalformedPacket("password flag without user name flag")
    props: Properties = {}
    if v5:
        props, pos = decode_properties(body, pos, end, CONNECT)
        if "authentication_data" in props and "authentication_method" not in props:
            raise ProtocolError("authentication data without a method")
    client_id, pos = decode_utf8(body, pos, end)
    will = None
    if will_flag:
        will_props: Properties = {}
        if v5:
            will_props, pos = decode_properties(body, pos, end, "will")
            rtopic = will_props.get("response_topic")
            if rtopic is not None and not valid_topic_name(rtopic):
                raise ProtocolError("invalid Will response topic")
        topic, pos = decode_utf8(body, pos, end)
        if not valid_topic_name(topic):
            raise MalformedPacket("invalid Will topic")
        payload, pos = decode_binary(body, pos, end)
        will = Will(topic, payload, will_qos, will_retain, will_props)
    username = None
    password = None
    if has_username:
        username, pos = decode_utf8(body, pos, end)
    if has_password:
        password, pos = decode_binary(body, pos, end)
    if pos != end:
        raise MalformedPacket("bytes after the CONNECT payload")
    return Connect(level, client_id, clean, keep_alive, will, username, password, props, name)


def _decode_subscribe(body: bytes | memoryview, end: int, v5: bool) -> Subscribe:
    pid = _packet_id(body, 0, end)
    pos = 2
    props: Properties = {}
    if v5:
        props, pos = decode_properties(body, pos, end, SUBSCRIBE)
        if len(props.get("subscription_identifier", ())) > 1:
            raise ProtocolError("more than one subscription identifier")
    topics: list[tuple[str, SubOptions]] = []
    while pos < end:
        filt, pos = decode_utf8(body, pos, end)
        if pos >= end:
            raise MalformedPacket("subscription options missing")
        opts = body[pos]
        pos += 1
        qos = opts & 0x03
        if qos == 3:
            raise MalformedPacket("subscription QoS 3")
        if v5:
            if opts & 0xC0:
                raise MalformedPacket("reserved subscription option bits set")
            rh = (opts >> 4) & 0x03
            if rh == 3:
                raise ProtocolError("retain handling 3")
            options = SubOptions(qos, bool(opts & 0x04), bool(opts & 0x08), rh)
            if options.no_local and filt.startswith("$share/"):
                raise ProtocolError("no local on a shared subscription")
        else:
            if opts & 0xFC:
                raise MalformedPacket("reserved subscription option bits set")
            options = SubOptions(qos)
        topics.append((filt, options))
    if not topics:
        raise ProtocolError("SUBSCRIBE without a topic filter")
    return Subscribe(pid, topics, props)


def _decode_unsubscribe(body: bytes | memoryview, end: int, v5: bool) -> Unsubscribe:
    pid = _packet_id(body, 0, end)
    pos = 2
    props: Properties = {}
    if v5:
        props, pos = decode_properties(body, pos, end, UNSUBSCRIBE)
    topics: list[str] = []
    while pos < end:
        filt, pos = decode_utf8(body, pos, end)
        topics.append(filt)
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(pid, topics, props)


def _decode_disconnect(body: bytes | memoryview, end: int, v5: bool) -> Disconnect:
    if not v5:
        if end:
            raise MalformedPacket("DISCONNECT must have no body in MQTT 3.1.1")
        return Disconnect()
    reason = body[0] if end else 0
    props: Properties = {}
    if end > 1:
        props, pos = decode_properties(body, 1, end, DISCONNECT)
        if pos != end:
            raise MalformedPacket("bytes after the properties")
    return Disconnect(reason, props)


def _decode_auth(body: bytes | memoryview, end: int) -> Auth:
    reason = body[0] if end else 0
    props: Properties = {}
    if end > 1:
        props, pos = decode_properties(body, 1, end, AUTH)
        if pos != end:
            raise MalformedPacket("bytes after the properties")
    return Auth(reason, props)


def _decode_connack(body: bytes | memoryview, end: int, v5: bool) -> Connack:
    if end < 2:
        raise MalformedPacket("CONNACK too short")
    if body[0] & 0xFE:
        raise MalformedPacket("CONNACK reserved flags set")
    props: Properties = {}
    if v5 and end > 2:
        props, pos = decode_properties(body, 2, end, CONNACK)
        if pos != end:
            raise MalformedPacket("bytes after the properties")
    elif end != 2:
        raise MalformedPacket("CONNACK length")
    return Connack(bool(body[0] & 1), body[1], props)


def _decode_suback(body: bytes | memoryview, end: int, v5: bool) -> Suback:
    pid = _packet_id(body, 0, end)
    pos = 2
    props: Properties = {}
    if v5:
        props, pos = decode_properties(body, pos, end, SUBACK)
    return Suback(pid, list(bytes(body[pos:end])), props)


def _decode_unsuback(body: bytes | memoryview, end: int, v5: bool) -> Unsuback:
    pid = _packet_id(body, 0, end)
    if not v5:
        if end != 2:
            raise MalformedPacket("3.1.1 UNSUBACK must have a 2 byte body")
        return Unsuback(pid)
    props, pos = decode_properties(body, 2, end, UNSUBACK)
    return Unsuback(pid, list(bytes(body[pos:end])), props)


# --------------------------------------------------------------------------- encoding


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int,
    props: bytes | None,
) -> bytes:
    """Fast path for PUBLISH: ``topic`` is UTF-8 bytes, ``props`` an encoded block or None."""
    first = 0x30 | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    head = _U16.pack(len(topic)) + topic
    if qos:
        head += _U16.pack(packet_id)
    if props is not None:
        head += props
    return bytes((first,)) + encode_varint(len(head) + len(payload)) + head + payload


def suback_bytes(packet_id: int, codes: list[int], v5: bool) -> bytes:
    """A SUBACK without properties: the bytes of ``encode(Suback(packet_id, codes), v)``,
    for one filter (the common case) without building the packet."""
    if len(codes) == 1:
        if v5:
            return bytes((0x90, 4, packet_id >> 8, packet_id & 0xFF, 0, codes[0]))
        return bytes((0x90, 3, packet_id >> 8, packet_id & 0xFF, codes[0]))
    return encode(Suback(packet_id, codes), MQTT_5 if v5 else 4)


def encode(packet: Packet, version: int) -> bytes:
    """Encode ``packet`` for a connection speaking protocol level ``version``."""
    v5 = version == MQTT_5
    t = packet.type
    if t == PUBLISH:
        assert isinstance(packet, Publish)
        return encode_publish(
            packet.topic.encode(), packet.payload, packet.qos, packet.retain, packet.dup,
            packet.packet_id, encode_properties(packet.properties) if v5 else None,
        )
    if t in _ACK_CLASSES:
        assert isinstance(packet, (Puback, Pubrec, Pubrel, Pubcomp))
        first = (t << 4) | (0x02 if t == PUBREL else 0)
        body = _U16.pack(packet.packet_id)
        if v5 and (packet.reason_code or packet.properties):
            body += bytes((packet.reason_code,))
            if packet.properties:
                body += encode_properties(packet.properties)
            return _frame(first, body)
        return bytes((first, len(body))) + body
    if t == PINGRESP:
        return _PINGRESP_BYTES
    if t == PINGREQ:
        return _PINGREQ_BYTES
    if t == CONNACK:
        assert isinstance(packet, Connack)
        body = bytes((1 if packet.session_present else 0, packet.reason_code))
        if v5:
            body += encode_properties(packet.properties)
        return _frame(0x20, body)
    if t == SUBACK:
        assert isinstance(packet, Suback)
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        return _frame(0x90, body + bytes(packet.reason_codes))
    if t == UNSUBACK:
        assert isinstance(packet, Unsuback)
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties) + bytes(packet.reason_codes)
        return _frame(0xB0, body)
    if t == DISCONNECT:
        assert isinstance(packet, Disconnect)
        if not v5:
            return b"\xe0\x00"
        body = bytes((packet.reason_code,))
        if packet.properties:
            body += encode_properties(packet.properties)
        return _frame(0xE0, body)
    if t == AUTH:
        assert isinstance(packet, Auth)
        return _frame(0xF0, bytes((packet.reason_code,)) + encode_properties(packet.properties))
    if t == CONNECT:
        assert isinstance(packet, Connect)
        return _encode_connect(packet)
    if t == SUBSCRIBE:
        assert isinstance(packet, Subscribe)
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for filt, o in packet.topics:
            opts = o.qos
            if v5:
                opts |= (
                    (0x04 if o.no_local else 0)
                    | (0x08 if o.retain_as_published else 0)
                    | (o.retain_handling << 4)
                )
            body += encode_utf8(filt) + bytes((opts,))
        return _frame(0x82, body)
    if t == UNSUBSCRIBE:
        assert isinstance(packet, Unsubscribe)
        body = _U16.pack(packet.packet_id)
        if v5:
            body += encode_properties(packet.properties)
        for filt in packet.topics:
            body += encode_utf8(filt)
        return _frame(0xA2, body)
    raise ValueError(f"cannot encode packet type {t}")


def _encode_connect(p: Connect) -> bytes:
    v5 = p.protocol_level == MQTT_5
    flags = 0x02 if p.clean_start else 0
    if p.will:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    body = encode_utf8(p.protocol_name) + bytes((p.protocol_level, flags)) + _U16.pack(p.keep_alive)
    if v5:
        body += encode_properties(p.properties)
    body += encode_utf8(p.client_id)
    if p.will:
        if v5:
            body += encode_properties(p.will.properties)
        body += encode_utf8(p.will.topic) + encode_binary(p.will.payload)
    if p.username is not None:
        body += encode_utf8(p.username)
    if p.password is not None:
        body += encode_binary(p.password)
    return _frame(0x10, body)

