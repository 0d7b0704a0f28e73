"""Shared MQTT test helpers: a bounded paho wrapper, a raw-socket client, mosquitto CLI runners.

Everything here binds/connects to 127.0.0.1 only and every wait is bounded.

Typical use::

    with PahoClient(gw.port, "sub-1") as sub:          # connects (MQTT 3.1.1), waits CONNACK
        assert sub.subscribe("a/b", qos=1) == [1]
        with PahoClient(gw.port) as pub:
            pub.publish("a/b", b"x", qos=1)          # waits until PUBACK
        msg = sub.get()                              # paho MQTTMessage, 5 s bound
        sub.assert_no_message(0.3)

    raw = RawClient(gw.port)                         # precise protocol checks
    try:
        assert raw.connect("c1", clean=False) == (False, 0)
        assert raw.subscribe([("t", 1)]) == [1]
        p = raw.expect_publish()                     # RawPublish(topic, payload, qos, ...)
    finally:
        raw.close()

``ClientTracker`` collects clients so a fixture can close all of them at teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 5.0

MQTTv311 = mqtt.MQTTv311
MQTTv5 = mqtt.MQTTv5

# packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15,
)

_counter = itertools.count()


def unique(prefix: str = "t") -> str:
    """A short name unique within this test run (client ids, topic prefixes)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


def wait_until(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT,
               interval: float = 0.02) -> bool:
    """Poll ``predicate`` until truthy; return False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# =========================================================================== paho wrapper


@dataclass
class Connack:
    """What paho reported in on_connect."""

    session_present: bool
    reason_code: int
    properties: Any = None


class PahoClient:
    """paho-mqtt 2.x client with a background loop, bounded waits and a message queue.

    Connects in ``__init__`` unless ``connect=False``; raises ``AssertionError`` when no
    CONNACK arrives in time or (with ``expect_success=True``) the CONNACK is a refusal.
    ``will`` is ``(topic, payload, qos, retain)`` or a dict of ``will_set`` kwargs.
    For MQTT 5 pass ``protocol=MQTTv5``; ``clean_session`` is then used as Clean Start and
    ``properties`` (paho ``Properties``) go into CONNECT.
    """

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        *,
        protocol: int = MQTTv311,
        clean_session: bool = True,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes | str, int, bool] | dict[str, Any] | None = None,
        keepalive: int = 60,
        properties: Properties | None = None,
        host: str = LOOPBACK,
        connect: bool = True,
        expect_success: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.port = port
        self.host = host
        self.client_id = unique("paho") if client_id is None else client_id
        self.protocol = protocol
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.connect_properties = properties
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: Connack | None = None
        self.disconnect_reason: Any = None
        self._connected = threading.Event()
        self._connack_event = threading.Event()
        self.disconnected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._ack_cond = threading.Condition()
        self._loop_started = False
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.client_id,
            "protocol": protocol,
        }
        if protocol != MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(**kwargs)
        # never retry automatically: tests decide about reconnects
        self.client.reconnect_delay_set(min_delay=60, max_delay=120)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            if isinstance(will, dict):
                self.client.will_set(**will)
            else:
                topic, payload, qos, retain = will
                self.client.will_set(topic, payload, qos, retain)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        if connect:
            self.connect(expect_success=expect_success, timeout=timeout)

    # -- callbacks (paho thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        rc_value = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
        self.connack = Connack(bool(flags.session_present), rc_value, properties)
        if rc_value == 0:
            self.disconnected.clear()
            self._connected.set()
        self._connack_event.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self.disconnect_reason = reason_code
        self._connected.clear()
        self.disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(msg)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        with self._ack_cond:
            self._acks[mid] = [int(getattr(r, "value", r)) for r in reason_codes]
            self._ack_cond.notify_all()

    def _on_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                        properties: Any) -> None:
        with self._ack_cond:
            self._acks[mid] = [int(getattr(r, "value", r)) for r in reason_codes]
            self._ack_cond.notify_all()

    # -- API ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def connect(self, expect_success: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Connack:
        """(Re)connect and wait for CONNACK."""
        self._connack_event.clear()
        self.connack = None
        kwargs: dict[str, Any] = {"keepalive": self.keepalive}
        if self.protocol == MQTTv5:
            kwargs["clean_start"] = self.clean_session
            if self.connect_properties is not None:
                kwargs["properties"] = self.connect_properties
        self.client.connect_async(self.host, self.port, **kwargs)
        if not self._loop_started:
            self.client.loop_start()
            self._loop_started = True
        if not self._connack_event.wait(timeout):
            self.stop()
            raise AssertionError(f"{self.client_id}: no CONNACK within {timeout} s")
        assert self.connack is not None
        if self.connack.reason_code != 0:
            self.stop()  # do not let paho retry a refused connection
            if expect_success:
                raise AssertionError(f"{self.client_id}: CONNACK refused: {self.connack}")
        return self.connack

    def _wait_ack(self, mid: int, what: str, timeout: float) -> list[int]:
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acks, timeout):
                raise AssertionError(f"{self.client_id}: no {what} within {timeout} s")
            return self._acks.pop(mid)

    def subscribe(self, topic: str | list[tuple[str, int]], qos: int = 0,
                  timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> list[int]:
        """Subscribe and return the SUBACK return codes / reason codes (as ints)."""
        res, mid = self.client.subscribe(topic, qos, **kwargs)
        assert res == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed locally: {res}"
        return self._wait_ack(mid, "SUBACK", timeout)

    def unsubscribe(self, topic: str | list[str], timeout: float = DEFAULT_TIMEOUT,
                    **kwargs: Any) -> list[int]:
        """Unsubscribe and wait for UNSUBACK (3.1.1 returns an empty list)."""
        res, mid = self.client.unsubscribe(topic, **kwargs)
        assert res == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe failed locally: {res}"
        return self._wait_ack(mid, "UNSUBACK", timeout)

    def publish(self, topic: str, payload: bytes | str = b"", qos: int = 0,
                retain: bool = False, wait: bool = True, timeout: float = DEFAULT_TIMEOUT,
                **kwargs: Any) -> mqtt.MQTTMessageInfo:
        """Publish; with ``wait`` block until written (QoS 0) or acknowledged (QoS 1/2)."""
        info = self.client.publish(topic, payload, qos, retain, **kwargs)
        if wait:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"{self.client_id}: publish to {topic} not completed"
        return info

    def get(self, timeout: float = DEFAULT_TIMEOUT) -> mqtt.MQTTMessage:
        """The next received message; AssertionError after ``timeout``."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"{self.client_id}: no message within {timeout} s"
            ) from None

    def get_n(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[mqtt.MQTTMessage]:
        """``n`` messages, all within ``timeout`` seconds in total."""
        deadline = time.monotonic() + timeout
        out: list[mqtt.MQTTMessage] = []
        while len(out) < n:
            left = deadline - time.monotonic()
            try:
                out.append(self.messages.get(timeout=max(0.0, left)))
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: got {len(out)} of {n} messages within {timeout} s: "
                    f"{[(m.topic, m.payload) for m in out]}"
                ) from None
        return out

    def drain(self, wait: float = 0.0) -> list[mqtt.MQTTMessage]:
        """Everything received so far (optionally after waiting ``wait`` seconds)."""
        if wait:
            time.sleep(wait)
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def assert_no_message(self, wait: float = 0.5) -> None:
        """Fail when any message arrives within ``wait`` seconds."""
        try:
            msg = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(
            f"{self.client_id}: unexpected message {msg.topic!r} {msg.payload!r} "
            f"qos={msg.qos} retain={msg.retain}"
        )

    def wait_disconnected(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        return self.disconnected.wait(timeout)

    def disconnect(self, timeout: float = 2.0) -> None:
        """Clean DISCONNECT (when connected), then stop the loop thread."""
        if self._connected.is_set():
            self.client.disconnect()
            self.disconnected.wait(timeout)
        self.stop()

    def stop(self) -> None:
        """Stop the loop thread without sending DISCONNECT (idempotent)."""
        if self._loop_started:
            self._loop_started = False
            self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    close = disconnect

    def __enter__(self) -> PahoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()


# =========================================================================== raw client


class ConnectionClosed(AssertionError):
    """The server closed the connection while a packet was expected."""


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def frame(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def build_connect(
    client_id: str,
    clean: bool = True,
    keepalive: int = 60,
    will: tuple[str, bytes, int, bool] | None = None,
    username: str | None = None,
    password: str | bytes | None = None,
    protocol_level: int = 4,
    protocol_name: str = "MQTT",
    properties: bytes = b"",
    will_properties: bytes = b"",
) -> bytes:
    """A CONNECT packet. For level 5, ``properties`` are the encoded property bytes."""
    flags = 0x02 if clean else 0
    payload = encode_str(client_id)
    v5 = protocol_level == 5
    if will is not None:
        topic, msg, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if v5:
            payload += encode_varint(len(will_properties)) + will_properties
        payload += encode_str(topic) + encode_str(msg)
    if username is not None:
        flags |= 0x80
        payload += encode_str(username)
    if password is not None:
        flags |= 0x40
        payload += encode_str(password)
    var = encode_str(protocol_name) + bytes((protocol_level, flags)) + struct.pack("!H", keepalive)
    if v5:
        var += encode_varint(len(properties)) + properties
    return frame(0x10, var + payload)


def build_publish(topic: str, payload: bytes = b"", qos: int = 0, packet_id: int = 0,
                  retain: bool = False, dup: bool = False, version: int = 4,
                  properties: bytes = b"") -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_str(topic)
    if qos:
        body += struct.pack("!H", packet_id)
    if version == 5:
        body += encode_varint(len(properties)) + properties
    return frame(first, body + payload)


def build_subscribe(packet_id: int, topics: Sequence[tuple[str, int]], version: int = 4) -> bytes:
    body = struct.pack("!H", packet_id)
    if version == 5:
        body += b"\x00"
    for filt, opts in topics:
        body += encode_str(filt) + bytes((opts,))
    return frame(0x82, body)


def build_unsubscribe(packet_id: int, filters: Iterable[str], version: int = 4) -> bytes:
    body = struct.pack("!H", packet_id) + (b"\x00" if version == 5 else b"")
    for f in filters:
        body += encode_str(f)
    return frame(0xA2, body)


@dataclass
class RawPacket:
    type: int
    flags: int
    body: bytes


@dataclass
class RawPublish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    properties: bytes = b""


def parse_publish(p: RawPacket, version: int = 4) -> RawPublish:
    assert p.type == PUBLISH, f"expected PUBLISH, got packet type {p.type}"
    qos = (p.flags >> 1) & 3
    (tlen,) = struct.unpack_from("!H", p.body, 0)
    pos = 2 + tlen
    topic = p.body[2:pos].decode()
    pid = 0
    if qos:
        (pid,) = struct.unpack_from("!H", p.body, pos)
        pos += 2
    props = b""
    if version == 5:
        plen, used = _decode_varint(p.body, pos)
        props = p.body[pos + used:pos + used + plen]
        pos += used + plen
    return RawPublish(topic, p.body[pos:], qos, bool(p.flags & 1), bool(p.flags & 8), pid, props)


def _decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(4):
        b = data[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, i + 1
    raise ValueError("bad varint")


class RawClient:
    """A blocking MQTT client on a plain socket, for byte-exact protocol checks."""

    def __init__(self, port: int, host: str = LOOPBACK, timeout: float = DEFAULT_TIMEOUT,
                 version: int = 4) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.version = version
        self._buf = bytearray()
        #: packets received while waiting for another type (see ``expect``)
        self.stash: list[RawPacket] = []
        self._pid = itertools.count(1)
        self.closed = False

    def next_pid(self) -> int:
        return next(self._pid) % 65535 or next(self._pid)

    # -- bytes -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from server in time")
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("no data from server in time") from None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self._buf += chunk
        return True

    def _try_parse(self) -> RawPacket | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(buf) < i + length:
            return None
        p = RawPacket(buf[0] >> 4, buf[0] & 0x0F, bytes(buf[i:i + length]))
        del buf[:i + length]
        return p

    def recv_packet(self, timeout: float = DEFAULT_TIMEOUT) -> RawPacket:
        """The next packet (stashed ones first); ``TimeoutError`` after ``timeout``,
        ``ConnectionClosed`` on EOF."""
        if self.stash:
            return self.stash.pop(0)
        return self._recv_wire(time.monotonic() + timeout)

    def _recv_wire(self, deadline: float) -> RawPacket:
        while True:
            p = self._try_parse()
            if p is not None:
                return p
            if not self._fill(deadline):
                raise ConnectionClosed("server closed the connection")

    def expect(self, ptype: int, timeout: float = DEFAULT_TIMEOUT) -> RawPacket:
        """The next packet of type ``ptype``; packets of other types that arrive first are
        kept (in order) in ``stash`` and returned by later ``recv_packet``/``expect`` calls."""
        for i, p in enumerate(self.stash):
            if p.type == ptype:
                return self.stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            p = self._recv_wire(deadline)
            if p.type == ptype:
                return p
            self.stash.append(p)

    def expect_publish(self, timeout: float = DEFAULT_TIMEOUT) -> RawPublish:
        return parse_publish(self.expect(PUBLISH, timeout), self.version)

    def assert_no_packet(self, wait: float = 0.5) -> None:
        """Fail when a packet is stashed or arrives within ``wait`` seconds."""
        try:
            p = self.recv_packet(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected packet type {p.type}: {p.body!r}")

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when the server closes the connection within ``timeout`` (packets skipped)."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._try_parse() is not None:
                    continue
                if not self._fill(deadline):
                    return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Close the socket without DISCONNECT (an abnormal disconnect for the broker)."""
        with contextlib.suppress(OSError):
            self.sock.close()
        self.closed = True

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- packets -----------------------------------------------------------------------

    def connect(self, client_id: str, clean: bool = True, keepalive: int = 60,
                timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> tuple[bool, int]:
        """Send CONNECT (see :func:`build_connect`); return (session_present, return code)."""
        kwargs.setdefault("protocol_level", self.version)
        self.send(build_connect(client_id, clean, keepalive, **kwargs))
        p = self.expect(CONNACK, timeout)
        return bool(p.body[0] & 1), p.body[1]

    def subscribe(self, topics: Sequence[tuple[str, int]], packet_id: int | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> list[int]:
        """SUBSCRIBE and return the SUBACK codes (other packets before it are an error)."""
        pid = packet_id or self.next_pid()
        self.send(build_subscribe(pid, topics, self.version))
        p = self.expect(SUBACK, timeout)
        assert struct.unpack_from("!H", p.body)[0] == pid, "SUBACK packet id mismatch"
        pos = 2
        if self.version == 5:
            plen, used = _decode_varint(p.body, 2)
            pos += used + plen
        return list(p.body[pos:])

    def unsubscribe(self, filters: Iterable[str], packet_id: int | None = None,
                    timeout: float = DEFAULT_TIMEOUT) -> RawPacket:
        pid = packet_id or self.next_pid()
        self.send(build_unsubscribe(pid, filters, self.version))
        p = self.expect(UNSUBACK, timeout)
        assert struct.unpack_from("!H", p.body)[0] == pid, "UNSUBACK packet id mismatch"
        return p

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0,
                packet_id: int | None = None, retain: bool = False, dup: bool = False) -> int:
        """Send PUBLISH (no waiting); return the packet id used (0 for QoS 0)."""
        pid = (packet_id or self.next_pid()) if qos else 0
        self.send(build_publish(topic, payload, qos, pid, retain, dup, self.version))
        return pid

    def _ack(self, first: int, pid: int) -> None:
        self.send(frame(first, struct.pack("!H", pid)))

    def puback(self, pid: int) -> None:
        self._ack(0x40, pid)

    def pubrec(self, pid: int) -> None:
        self._ack(0x50, pid)

    def pubrel(self, pid: int) -> None:
        self._ack(0x62, pid)

    def pubcomp(self, pid: int) -> None:
        self._ack(0x70, pid)

    def pingreq(self) -> None:
        self.send(b"\xc0\x00")

    def disconnect(self, wait: float = 2.0) -> None:
        """Clean DISCONNECT; wait (up to ``wait`` s) until the server has closed the
        connection, so the broker has processed it; then close the socket."""
        with contextlib.suppress(OSError):
            self.send(b"\xe0\x00" if self.version != 5 else b"\xe0\x01\x00")
            if wait:
                self.wait_closed(wait)
        self.close()

    def publish_qos1(self, topic: str, payload: bytes, retain: bool = False,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        """QoS 1 publish and wait for its PUBACK."""
        pid = self.publish(topic, payload, 1, retain=retain)
        p = self.expect(PUBACK, timeout)
        assert struct.unpack_from("!H", p.body)[0] == pid

    def publish_qos2(self, topic: str, payload: bytes, retain: bool = False,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
        """Full QoS 2 publish flow (PUBLISH, PUBREC, PUBREL, PUBCOMP)."""
        pid = self.publish(topic, payload, 2, retain=retain)
        p = self.expect(PUBREC, timeout)
        assert struct.unpack_from("!H", p.body)[0] == pid
        self.pubrel(pid)
        p = self.expect(PUBCOMP, timeout)
        assert struct.unpack_from("!H", p.body)[0] == pid


# =========================================================================== tracking


@dataclass
class ClientTracker:
    """Creates clients for one gateway port and closes all of them in ``close_all``."""

    port: int
    clients: list[Any] = field(default_factory=list)

    def paho(self, client_id: str | None = None, **kwargs: Any) -> PahoClient:
        kwargs.setdefault("connect", False)
        connect = kwargs.pop("connect")
        expect_success = kwargs.pop("expect_success", True)
        c = PahoClient(self.port, client_id, connect=False, **kwargs)
        self.clients.append(c)
        if connect:
            c.connect(expect_success=expect_success)
        return c

    def connected(self, client_id: str | None = None, **kwargs: Any) -> PahoClient:
        """A paho client, connected (CONNACK 0 asserted)."""
        return self.paho(client_id, connect=True, **kwargs)

    def raw(self, **kwargs: Any) -> RawClient:
        c = RawClient(self.port, **kwargs)
        self.clients.append(c)
        return c

    def close_all(self) -> None:
        for c in reversed(self.clients):
            try:
                if isinstance(c, PahoClient):
                    c.disconnect(timeout=1.0)
                else:
                    c.close()
            except Exception:  # pragma: no cover - teardown is best effort
                pass
        self.clients.clear()


# =========================================================================== mosquitto CLI


MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"


def mosquitto_pub(port: int, topic: str, message: str | None, qos: int = 0,
                  retain: bool = False, version: str = "mqttv311",
                  extra: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
                  client_id: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``mosquitto_pub`` once (``message=None`` sends an empty payload, ``-n``)."""
    cmd = [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", str(port), "-t", topic, "-q", str(qos),
           "-V", version, "-i", client_id or unique("mpub")]
    cmd += ["-n"] if message is None else ["-m", message]
    if retain:
        cmd.append("-r")
    cmd += list(extra)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"mosquitto_pub failed ({res.returncode}): {res.stderr}"
    return res


class MosquittoSub:
    """A ``mosquitto_sub`` subprocess; ``ready()`` waits until its SUBACK was received.

    Output lines are ``topic payload`` (``-v``); with ``retained_flag`` each line is
    prefixed by ``R`` (retained) or ``N`` via ``-F``.
    """

    def __init__(self, port: int, topics: str | Sequence[str], count: int, qos: int = 0,
                 version: str = "mqttv311", extra: Sequence[str] = (),
                 timeout: float = DEFAULT_TIMEOUT, fmt: str | None = None,
                 client_id: str | None = None) -> None:
        topics = [topics] if isinstance(topics, str) else list(topics)
        self.count = count
        # stdbuf: line-buffered stdout, so ready() sees the SUBACK debug line at once
        cmd = ["stdbuf", "-oL", MOSQUITTO_SUB, "-h", LOOPBACK, "-p", str(port), "-q", str(qos),
               "-V", version,
               "-C", str(count), "-W", str(max(1, int(timeout + 0.999))), "-d",
               "-i", client_id or unique("msub")]
        for t in topics:
            cmd += ["-t", t]
        if fmt is not None:
            cmd += ["-F", fmt]
        else:
            cmd.append("-v")
        cmd += list(extra)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines: list[str] = []
        self._debug: list[str] = []
        self._suback = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("Client ") and (" received " in line or " sending " in line):
                self._debug.append(line)
                if "received SUBACK" in line:
                    self._suback.set()
            elif line.startswith("Subscribed (mid"):
                self._suback.set()
                self._debug.append(line)
            else:
                self.lines.append(line)

    def ready(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not self._suback.wait(timeout):
            self.stop()
            raise AssertionError(f"mosquitto_sub got no SUBACK: {self._debug} {self.lines}")

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Wait for the process to exit (after ``count`` messages); return payload lines."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"mosquitto_sub did not get {self.count} messages: {self.lines} {self._debug}"
            ) from None
        self._reader.join(2)
        return list(self.lines)

    @property
    def debug_lines(self) -> list[str]:
        return list(self._debug)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> MosquittoSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
