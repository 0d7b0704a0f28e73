"""Small MQTT 5.0 test clients for ``test_mqtt5*.py``: a raw socket client and a paho wrapper.

The raw client encodes and decodes packets itself (independently of the gateway's codec),
so tests can send exactly the bytes a check needs and see exactly what the server sends.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

LOOPBACK = "127.0.0.1"

# Packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)

# Property ids and their wire types
_B, _H, _I, _V, _S, _D, _P = "byte", "u16", "u32", "varint", "str", "bin", "pair"
PROP_TYPES: dict[int, tuple[str, str]] = {
    0x01: ("payload_format_indicator", _B),
    0x02: ("message_expiry_interval", _I),
    0x03: ("content_type", _S),
    0x08: ("response_topic", _S),
    0x09: ("correlation_data", _D),
    0x0B: ("subscription_identifier", _V),
    0x11: ("session_expiry_interval", _I),
    0x12: ("assigned_client_identifier", _S),
    0x13: ("server_keep_alive", _H),
    0x15: ("authentication_method", _S),
    0x16: ("authentication_data", _D),
    0x17: ("request_problem_information", _B),
    0x18: ("will_delay_interval", _I),
    0x19: ("request_response_information", _B),
    0x1A: ("response_information", _S),
    0x1C: ("server_reference", _S),
    0x1F: ("reason_string", _S),
    0x21: ("receive_maximum", _H),
    0x22: ("topic_alias_maximum", _H),
    0x23: ("topic_alias", _H),
    0x24: ("maximum_qos", _B),
    0x25: ("retain_available", _B),
    0x26: ("user_property", _P),
    0x27: ("maximum_packet_size", _I),
    0x28: ("wildcard_subscription_available", _B),
    0x29: ("subscription_identifier_available", _B),
    0x2A: ("shared_subscription_available", _B),
}
PROP_IDS = {name: (pid, t) for pid, (name, t) in PROP_TYPES.items()}
_MULTI = {"user_property", "subscription_identifier"}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s16(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def props(**kw: Any) -> bytes:
    """Encode a property block: ``props(session_expiry_interval=10, user_property=[...])``."""
    out = bytearray()
    for name, value in kw.items():
        pid, t = PROP_IDS[name]
        for v in (value if name in _MULTI else [value]):
            out += varint(pid)
            if t == _B:
                out.append(v)
            elif t == _H:
                out += struct.pack("!H", v)
            elif t == _I:
                out += struct.pack("!I", v)
            elif t == _V:
                out += varint(v)
            elif t in (_S, _D):
                out += s16(v)
            else:
                out += s16(v[0]) + s16(v[1])
    return varint(len(out)) + bytes(out)


def parse_props(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """Decode a property block at ``pos``; return (dict, position after it)."""
    length, pos = _read_varint(buf, pos)
    end = pos + length
    out: dict[str, Any] = {}
    while pos < end:
        pid, pos = _read_varint(buf, pos)
        name, t = PROP_TYPES[pid]
        v: Any
        if t == _B:
            v, pos = buf[pos], pos + 1
        elif t == _H:
            v, pos = struct.unpack_from("!H", buf, pos)[0], pos + 2
        elif t == _I:
            v, pos = struct.unpack_from("!I", buf, pos)[0], pos + 4
        elif t == _V:
            v, pos = _read_varint(buf, pos)
        elif t in (_S, _D):
            n = struct.unpack_from("!H", buf, pos)[0]
            raw = buf[pos + 2:pos + 2 + n]
            v, pos = (raw.decode() if t == _S else raw), pos + 2 + n
        else:
            k, pos = _read_str(buf, pos)
            val, pos = _read_str(buf, pos)
            v = (k, val)
        if name in _MULTI:
            out.setdefault(name, []).append(v)
        else:
            out[name] = v
    assert pos == end, "property block length mismatch"
    return out, end


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    n = struct.unpack_from("!H", buf, pos)[0]
    return buf[pos + 2:pos + 2 + n].decode(), pos + 2 + n


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


# --------------------------------------------------------------------------- packet encoders


def connect_packet(
    client_id: str,
    *,
    clean_start: bool = True,
    keep_alive: int = 60,
    properties: bytes = b"\x00",
    will: tuple[str, bytes, int, bool, bytes] | None = None,  # topic, payload, qos, retain, props
    username: str | None = None,
    password: bytes | None = None,
    level: int = 5,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = s16("MQTT") + bytes((level, flags)) + struct.pack("!H", keep_alive)
    if level == 5:
        body += properties
    body += s16(client_id)
    if will is not None:
        if level == 5:
            body += will[4]
        body += s16(will[0]) + s16(will[1])
    if username is not None:
        body += s16(username)
    if password is not None:
        body += s16(password)
    return frame(0x10, body)


def publish_packet(
    topic: str, payload: bytes = b"", qos: int = 0, packet_id: int = 0, retain: bool = False,
    properties: bytes = b"\x00", dup: bool = False,
) -> bytes:
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s16(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    return frame(first, body + properties + payload)


def subscribe_packet(
    packet_id: int, filters: list[tuple[str, int]], properties: bytes = b"\x00"
) -> bytes:
    """``filters``: (filter, options byte) pairs; options = qos | nl<<2 | rap<<3 | rh<<4."""
    body = struct.pack("!H", packet_id) + properties
    for f, opts in filters:
        body += s16(f) + bytes((opts,))
    return frame(0x82, body)


def unsubscribe_packet(packet_id: int, filters: list[str]) -> bytes:
    body = struct.pack("!H", packet_id) + b"\x00"
    for f in filters:
        body += s16(f)
    return frame(0xA2, body)


def ack_packet(ptype: int, packet_id: int, reason: int = 0) -> bytes:
    body = struct.pack("!H", packet_id)
    if reason:
        body += bytes((reason,))
    return frame((ptype << 4) | (0x02 if ptype == PUBREL else 0), body)


def disconnect_packet(reason: int = 0, properties: bytes = b"\x00") -> bytes:
    return frame(0xE0, bytes((reason,)) + properties)


# --------------------------------------------------------------------------- packets received


@dataclass
class Packet:
    """One packet from the server, with the fields of its type decoded."""

    type: int
    flags: int
    body: bytes
    raw: bytes
    reason: int = 0
    packet_id: int = 0
    properties: dict[str, Any] = field(default_factory=dict)
    # CONNACK
    session_present: bool = False
    # PUBLISH
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    # SUBACK / UNSUBACK
    codes: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"Packet(type={self.type}, reason=0x{self.reason:02x}, pid={self.packet_id}, "
            f"topic={self.topic!r}, payload={self.payload[:40]!r}, props={self.properties})"
        )


def _decode(first: int, body: bytes, raw: bytes, v5: bool) -> Packet:
    t = first >> 4
    p = Packet(t, first & 0x0F, body, raw)
    if t == CONNACK:
        p.session_present = bool(body[0] & 1)
        p.reason = body[1]
        if v5 and len(body) > 2:
            p.properties, _ = parse_props(body, 2)
    elif t == PUBLISH:
        p.qos = (first >> 1) & 3
        p.retain = bool(first & 1)
        p.dup = bool(first & 8)
        p.topic, pos = _read_str(body, 0)
        if p.qos:
            p.packet_id = struct.unpack_from("!H", body, pos)[0]
            pos += 2
        if v5:
            p.properties, pos = parse_props(body, pos)
        p.payload = body[pos:]
    elif t in (PUBACK, PUBREC, PUBREL, PUBCOMP):
        p.packet_id = struct.unpack_from("!H", body, 0)[0]
        if len(body) > 2:
            p.reason = body[2]
        if len(body) > 3:
            p.properties, _ = parse_props(body, 3)
    elif t in (SUBACK, UNSUBACK):
        p.packet_id = struct.unpack_from("!H", body, 0)[0]
        pos = 2
        if v5:
            p.properties, pos = parse_props(body, 2)
        p.codes = list(body[pos:])
    elif t in (DISCONNECT, AUTH):
        if body:
            p.reason = body[0]
        if len(body) > 1:
            p.properties, _ = parse_props(body, 1)
    return p


class RawClient:
    """A blocking MQTT client on a plain socket: send bytes, read decoded packets."""

    def __init__(self, port: int, v5: bool = True) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.v5 = v5
        self._buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False at EOF or when ``deadline`` passes."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self.eof:
            return False
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    def recv(self, timeout: float = 5.0) -> Packet | None:
        """The next packet, or None when the connection closed or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            buf = self._buf
            if len(buf) >= 2:
                length = shift = 0
                i = 1
                complete = False
                while i < len(buf) and i <= 4:
                    b = buf[i]
                    length |= (b & 0x7F) << shift
                    i += 1
                    if not b & 0x80:
                        complete = True
                        break
                    shift += 7
                if complete and len(buf) >= i + length:
                    raw = buf[:i + length]
                    self._buf = buf[i + length:]
                    return _decode(buf[0], buf[i:i + length], raw, self.v5)
            if not self._fill(deadline):
                return None

    def expect(self, ptype: int, timeout: float = 5.0) -> Packet:
        """The next packet, which must be of type ``ptype``."""
        p = self.recv(timeout)
        assert p is not None, f"expected packet type {ptype}, got EOF/timeout"
        assert p.type == ptype, f"expected packet type {ptype}, got {p!r}"
        return p

    def recv_all(self, timeout: float) -> list[Packet]:
        """Every packet arriving within ``timeout`` seconds (stops early at EOF)."""
        deadline = time.monotonic() + timeout
        out: list[Packet] = []
        while True:
            p = self.recv(max(0.0, deadline - time.monotonic()))
            if p is None:
                return out
            out.append(p)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout`` (packets skipped)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if self.recv(max(0.0, deadline - time.monotonic())) is None and not self.eof:
                return False
        return True

    def connect(self, client_id: str, **kw: Any) -> Packet:
        """Send CONNECT and return the CONNACK (asserting success unless ``check=False``)."""
        check = kw.pop("check", True)
        self.send(connect_packet(client_id, **kw))
        ack = self.expect(CONNACK)
        if check:
            assert ack.reason == 0, f"CONNACK refused: {ack!r}"
        return ack

    def subscribe(self, filters: list[tuple[str, int]], packet_id: int = 1,
                  properties: bytes = b"\x00") -> list[int]:
        self.send(subscribe_packet(packet_id, filters, properties))
        ack = self.expect(SUBACK)
        assert ack.packet_id == packet_id
        return ack.codes


def raw_connect(port: int, client_id: str, **kw: Any) -> RawClient:
    """A connected raw MQTT 5 client (the caller closes it)."""
    c = RawClient(port)
    try:
        c.connect(client_id, **kw)
    except BaseException:
        c.close()
        raise
    return c


# --------------------------------------------------------------------------- paho wrapper


def uid(prefix: str = "t") -> str:
    """A unique name for client ids and topics."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Paho:
    """A paho-mqtt 2.x MQTT 5 client with blocking helpers; no automatic reconnects."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        *,
        clean_start: bool = True,
        session_expiry: int | None = None,
        connect_props: dict[str, Any] | None = None,
        will: tuple[str, bytes, int, bool, dict[str, Any] | None] | None = None,
        keep_alive: int = 30,
    ) -> None:
        self.client_id = client_id if client_id is not None else uid("paho")
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        self.client = c
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self._connack: queue.Queue[tuple[bool, int, Any]] = queue.Queue()
        self._acks: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._lock = threading.Lock()
        c.on_connect = self._on_connect
        c.on_message = lambda _c, _u, m: self.messages.put(m)
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_ack
        c.on_subscribe = self._on_ack
        c.on_unsubscribe = self._on_ack
        if will is not None:
            wp = None
            if will[4]:
                wp = Properties(PacketTypes.WILLMESSAGE)
                for k, v in will[4].items():
                    setattr(wp, k, v)
            c.will_set(will[0], will[1], will[2], will[3], properties=wp)
        cp = Properties(PacketTypes.CONNECT)
        if session_expiry is not None:
            cp.SessionExpiryInterval = session_expiry
        for k, v in (connect_props or {}).items():
            setattr(cp, k, v)
        c.connect(LOOPBACK, port, keepalive=keep_alive, clean_start=clean_start, properties=cp)
        c.loop_start()
        try:
            self.session_present, rcode, self.connack_props = self._connack.get(timeout=5)
        except queue.Empty:
            self.stop()
            raise AssertionError("no CONNACK within 5 s") from None
        if rcode != 0:
            self.stop()
            raise AssertionError(f"connection refused: {rcode}")

    # callbacks (paho's network thread)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, rcode: Any, properties: Any) -> None:
        self._connack.put((bool(flags.session_present), int(rcode.value), properties))

    def _on_disconnect(self, c: Any, _u: Any, _f: Any, rcode: Any, _p: Any) -> None:
        self.disconnects.put(int(rcode.value))
        # no automatic reconnect: a test decides when to connect again
        threading.Thread(target=c.loop_stop, daemon=True).start()

    def _on_ack(self, _c: Any, _u: Any, mid: int, *rest: Any) -> None:
        with self._lock:
            ev, box = self._acks.setdefault(mid, (threading.Event(), []))
        box.append(rest)
        ev.set()

    def _wait_ack(self, mid: int, timeout: float = 5.0) -> Any:
        with self._lock:
            ev, box = self._acks.setdefault(mid, (threading.Event(), []))
        assert ev.wait(timeout), f"no acknowledgement for mid {mid}"
        with self._lock:
            del self._acks[mid]
        return box[0]

    # operations

    def subscribe(
        self, filt: str, qos: int = 0, *, no_local: bool = False, rap: bool = False,
        rh: int = 0, sub_id: int | None = None,
    ) -> list[int]:
        """Subscribe and return the SUBACK reason codes."""
        p = None
        if sub_id is not None:
            p = Properties(PacketTypes.SUBSCRIBE)
            p.SubscriptionIdentifier = sub_id
        opts = SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=rap,
                                retainHandling=rh)
        res, mid = self.client.subscribe(filt, options=opts, properties=p)
        assert res == mqtt.MQTT_ERR_SUCCESS
        codes, _props = self._wait_ack(mid)
        return [int(c.value) for c in codes]

    def unsubscribe(self, filt: str) -> list[int]:
        res, mid = self.client.unsubscribe(filt)
        assert res == mqtt.MQTT_ERR_SUCCESS
        codes, _props = self._wait_ack(mid)
        return [int(c.value) for c in (codes if isinstance(codes, list) else [codes])]

    def publish(
        self, topic: str, payload: bytes | str = b"", qos: int = 0, retain: bool = False,
        **properties: Any,
    ) -> int | None:
        """Publish; for QoS 1/2 wait for the acknowledgement and return its reason code."""
        p = None
        if properties:
            p = Properties(PacketTypes.PUBLISH)
            for k, v in properties.items():
                setattr(p, k, v)
        info = self.client.publish(topic, payload, qos, retain, properties=p)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos == 0:
            return None
        rcode, _props = self._wait_ack(info.mid)
        return int(rcode.value)

    def get(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout} s") from None

    def drain(self, timeout: float) -> list[mqtt.MQTTMessage]:
        """Every message arriving within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            try:
                out.append(self.messages.get(timeout=remaining))
            except queue.Empty:
                return out

    def disconnect(self, reason: int = 0, session_expiry: int | None = None) -> None:
        """Send DISCONNECT and stop the network loop."""
        from paho.mqtt.reasoncodes import ReasonCode

        p = None
        if session_expiry is not None:
            p = Properties(PacketTypes.DISCONNECT)
            p.SessionExpiryInterval = session_expiry
        rcode = ReasonCode(PacketTypes.DISCONNECT, identifier=reason)
        self.client.disconnect(reasoncode=rcode, properties=p)
        self.client.loop_stop()

    def stop(self) -> None:
        """Disconnect if still connected (idempotent)."""
        try:
            if self.client.is_connected():
                self.client.disconnect()
        finally:
            self.client.loop_stop()


class Clients:
    """Creates test clients and closes them all at teardown (see the ``clients`` fixtures)."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._open: list[Paho | RawClient] = []

    def paho(self, client_id: str | None = None, *, port: int | None = None, **kw: Any) -> Paho:
        c = Paho(port or self.port, client_id, **kw)
        self._open.append(c)
        return c

    def raw(self, client_id: str | None = None, *, port: int | None = None,
            **kw: Any) -> RawClient:
        """A raw client; connected (CONNACK success asserted) when ``client_id`` is given."""
        c = RawClient(port or self.port)
        self._open.append(c)
        if client_id is not None:
            c.connect(client_id, **kw)
        return c

    def close_all(self) -> None:
        for c in reversed(self._open):
            with contextlib.suppress(Exception):  # teardown goes on
                c.stop() if isinstance(c, Paho) else c.close()
        self._open.clear()
