"""Cheap raw-socket MQTT 3.1.1 load generator used by ``bench/mqtt_throughput.py``.

Python MQTT client libraries (paho) spend several microseconds per message and top out
near 27k msg/s, which is slower than the brokers under test.  This module avoids any
per-message Python work on the hot paths:

* **Publisher, QoS 0**: one PUBLISH packet is encoded once, repeated into a ~256 KiB
  buffer and written with ``sock.sendall`` until N packets have gone out.
* **Publisher, QoS 1**: a ring of pre-encoded PUBLISH packets with packet ids
  ``1..P`` is kept in one buffer; the publisher keeps ``window`` messages in flight,
  reads PUBACKs (4 bytes each in MQTT 3.1.1) in bulk and sends exactly as many new
  packets as were acknowledged, as one contiguous slice of the ring.
* **Subscriber(s)**: one process serves one or many connections with ``selectors``,
  reads with 256 KiB ``recv`` calls and walks the fixed headers (type byte + remaining
  length) to count PUBLISH packets; for QoS 1 the PUBACKs of one ``recv`` are sent in a
  single ``sendall``.  It records ``(time, count)`` samples (at most one per ms) so the
  caller can compute the rate over the steady part of the run.
* **Latency mode**: the publisher paces messages at a fixed rate and puts
  ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by all processes on Linux) in the
  first 8 payload bytes; the subscriber subtracts it from the receive time.

Workers run in separate processes (see ``bench/mqtt_throughput.py``) and report a dict
through a ``multiprocessing`` connection.  Every blocking call has a timeout and every
loop has a deadline.  Only loopback addresses are accepted.

The module can also be used from the command line for manual checks, e.g.::

    python3 bench/loadgen.py --port 1883 --qos 0 --messages 200000 --size 64
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import selectors
import socket
import struct
import sys
import time
from bisect import bisect_right
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

CONNECT_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024
CHUNK_BYTES = 256 * 1024
NAP_BELOW = 64 * 1024
DISCONNECT = b"\xe0\x00"
KEEPALIVE = 600

# --------------------------------------------------------------------------- encoding


def encode_varint(value: int) -> bytes:
    """MQTT "remaining length" variable byte integer."""
    out = bytearray()
    while True:
        byte = value % 128
        value //= 128
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_str(text: str | bytes) -> bytes:
    """Two-byte length prefixed UTF-8 string."""
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keepalive: int = KEEPALIVE) -> bytes:
    """MQTT 3.1.1 CONNECT with clean session and no credentials."""
    body = encode_str("MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big")
    body += encode_str(client_id)
    return b"\x10" + encode_varint(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    """SUBSCRIBE with a single topic filter."""
    body = packet_id.to_bytes(2, "big") + encode_str(topic) + bytes([qos])
    return b"\x82" + encode_varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0) -> bytes:
    """PUBLISH (no retain, no dup)."""
    body = encode_str(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += payload
    return bytes([0x30 | (qos << 1)]) + encode_varint(len(body)) + body


# --------------------------------------------------------------------------- sockets


def _check_loopback(host: str) -> None:
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resolve {host!r}: {exc}") from exc
    if not addr.is_loopback:
        raise ValueError(f"refusing to send load to non-loopback address {addr}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return bytes(buf)


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """Blocking read of exactly one packet (uses the socket's timeout)."""
    first = _recv_exact(sock, 1)[0]
    length = 0
    mult = 1
    for _ in range(4):
        byte = _recv_exact(sock, 1)[0]
        length += (byte & 0x7F) * mult
        if not byte & 0x80:
            break
        mult *= 128
    else:
        raise ConnectionError("malformed remaining length")
    return first, _recv_exact(sock, length) if length else b""


def _expect(sock: socket.socket, ptype: int, what: str) -> bytes:
    first, body = read_packet(sock)
    if first >> 4 != ptype:
        raise ConnectionError(f"expected {what}, got packet type {first >> 4}")
    return body


def open_client(
    host: str, port: int, client_id: str, timeout: float = CONNECT_TIMEOUT
) -> socket.socket:
    """TCP connect + CONNECT/CONNACK.  Raises on refusal or timeout."""
    _check_loopback(host)
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(connect_packet(client_id))
        body = _expect(sock, 2, "CONNACK")
        if len(body) < 2 or body[1] != 0:
            raise ConnectionError(f"CONNACK refused: {body.hex()}")
    except BaseException:
        sock.close()
        raise
    return sock


def subscribe(sock: socket.socket, topic: str, qos: int, packet_id: int = 1) -> None:
    """SUBSCRIBE/SUBACK; raises if the broker refuses the subscription."""
    sock.sendall(subscribe_packet(packet_id, topic, qos))
    body = _expect(sock, 9, "SUBACK")
    if len(body) < 3 or body[2] >= 0x80:
        raise ConnectionError(f"SUBACK refused: {body.hex()}")


def close_quietly(sock: socket.socket, disconnect: bool = True) -> None:
    """Send DISCONNECT (best effort) and close."""
    try:
        if disconnect:
            sock.settimeout(1.0)
            sock.sendall(DISCONNECT)
    except OSError:
        pass
    finally:
        sock.close()


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))


def set_kernel_timeouts(sock: socket.socket, recv: float, send: float = 10.0) -> None:
    """Blocking socket whose recv/send fail with EAGAIN after a timeout (SO_RCVTIMEO/SNDTIMEO).

    Unlike ``settimeout`` this costs no extra poll() syscall per call.
    """
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(recv))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send))


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- parsing


def scan(buf: bytes, acks: bytearray | None, lat: list[int] | None, now_ns: int,
         json_stamp: bool = False) -> tuple[int, int]:
    """Walk complete packets in ``buf``.

    Returns ``(publish_count, consumed_bytes)``.  Appends PUBACKs for QoS>0 publishes to
    ``acks`` and ``now_ns - payload timestamp`` to ``lat`` when they are not None (the
    timestamp: 8 bytes big-endian, or with ``json_stamp`` the 19 digits of
    :data:`JSON_STAMP`'s ``"ts"``).
    """
    n = len(buf)
    pos = 0
    count = 0
    detail = acks is not None or lat is not None
    while pos + 2 <= n:
        b0 = buf[pos]
        rl = buf[pos + 1]
        hp = pos + 2
        if rl & 0x80:
            rl &= 0x7F
            mult = 128
            while True:
                if hp >= n:
                    return count, pos
                byte = buf[hp]
                hp += 1
                rl += (byte & 0x7F) * mult
                if not byte & 0x80:
                    break
                mult *= 128
        end = hp + rl
        if end > n:
            break
        if b0 >> 4 == 3:
            count += 1
            if detail:
                p = hp + 2 + ((buf[hp] << 8) | buf[hp + 1])
                if b0 & 0x06:
                    if acks is not None:
                        acks += b"\x40\x02"
                        acks += buf[p : p + 2]
                    p += 2
                if lat is not None and json_stamp:
                    if buf[p : p + 6] == b'{"ts":':  # other messages on the topic: no stamp
                        lat.append(now_ns - int(buf[p + 6 : p + 25]))
                elif lat is not None and end - p >= 8:
                    lat.append(now_ns - int.from_bytes(buf[p : p + 8], "big"))
        pos = end
    return count, pos


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def steady_rate(samples: list[tuple[float, int]], lo: float = 0.1, hi: float = 0.9) -> float:
    """Messages/s between the moments the count crossed ``lo`` and ``hi`` of the total."""
    if len(samples) < 2:
        return 0.0
    total = samples[-1][1]
    a = next(s for s in samples if s[1] >= lo * total)
    b = next(s for s in samples if s[1] >= hi * total)
    if b[0] - a[0] > 0.005 and b[1] > a[1]:
        return (b[1] - a[1]) / (b[0] - a[0])
    first, last = samples[0], samples[-1]
    if last[0] > first[0]:
        return (last[1] - first[1]) / (last[0] - first[0])
    return 0.0


# --------------------------------------------------------------------------- subscriber


def run_subscriber(
    host: str,
    port: int,
    topic: str,
    qos: int,
    conns: int,
    expected_per_conn: int,
    latency: bool = False,
    json_stamp: bool = False,
    start_timeout: float = 15.0,
    idle_timeout: float = 3.0,
    max_seconds: float = 120.0,
    ready: Connection | None = None,
    client_prefix: str = "lg-sub",
    nap: float = 0.0,
) -> dict[str, Any]:
    """Subscribe ``conns`` connections to ``topic`` and count deliveries.

    Stops when every connection got ``expected_per_conn`` messages, or no data arrived
    for ``idle_timeout`` seconds (after the first message), or ``start_timeout`` passed
    without any message, or after ``max_seconds``.  If ``ready`` is given, ``"ready"`` is
    sent on it once all subscriptions are acknowledged.

    ``nap`` > 0 (QoS 0 throughput only): after a pass that read less than ``NAP_BELOW``
    bytes, sleep that long so the next reads return bigger batches.  This cuts the
    subscriber's syscalls per message several-fold; the data waiting meanwhile
    (``nap`` x rate, a few tens of KiB) fits in the socket buffers.
    """
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for i in range(conns):
            sock = open_client(host, port, f"{client_prefix}-{os.getpid()}-{i}")
            socks.append(sock)
            subscribe(sock, topic, qos)
        if ready is not None:
            ready.send("ready")
        counts = [0] * conns
        rems = [b""] * conns
        single = conns == 1
        for i, sock in enumerate(socks):
            if single:
                # One connection: plain blocking recv bounded by SO_RCVTIMEO (one syscall
                # per read instead of poll+recv or epoll_wait+recv).
                set_kernel_timeouts(sock, 0.2)
            else:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ, i)
        lat: list[int] | None = [] if latency else None
        samples: list[tuple[float, int]] = []
        total = 0
        target = expected_per_conn * conns
        cpu0 = _cpu_seconds()
        t_start = time.monotonic()
        hard_deadline = t_start + max_seconds
        last_data = t_start
        first_t = 0.0
        last_sample = 0.0
        reason = "complete"
        open_conns = conns
        ready_idx = [(0, None)]
        while total < target:
            now = time.monotonic()
            if now >= hard_deadline:
                reason = "max_seconds"
                break
            if total == 0 and now - t_start > start_timeout:
                reason = "no messages received"
                break
            if total and now - last_data > idle_timeout:
                reason = "idle_timeout"
                break
            if open_conns == 0:
                reason = "broker closed connections"
                break
            if single:
                events: list[Any] = ready_idx
            else:
                events = [(key.data, None) for key, _ in sel.select(timeout=0.2)]
            got = 0
            for i, _ in events:
                sock = socks[i]
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    if not single:
                        sel.unregister(sock)
                    open_conns -= 1
                    continue
                now = time.monotonic()
                got += len(data)
                buf = rems[i] + data if rems[i] else data
                acks = bytearray() if qos else None
                cnt, used = scan(buf, acks, lat, time.monotonic_ns() if lat is not None else 0,
                                 json_stamp)
                rems[i] = buf[used:]
                if acks:
                    if single:
                        sock.sendall(acks)
                    else:
                        sock.setblocking(True)
                        sock.settimeout(5.0)
                        sock.sendall(acks)
                        sock.setblocking(False)
                if cnt:
                    counts[i] += cnt
                    total += cnt
                    if not first_t:
                        first_t = now
                        samples.append((now, 0))
                    last_data = now
                    if now - last_sample >= 0.001:
                        samples.append((now, total))
                        last_sample = now
            if nap and got < NAP_BELOW:
                time.sleep(nap)
        if samples and samples[-1][1] != total:
            samples.append((last_data, total))
        cpu = _cpu_seconds() - cpu0
        result: dict[str, Any] = {
            "received": total,
            "expected": target,
            "per_conn_min": min(counts),
            "per_conn_max": max(counts),
            "stop_reason": reason,
            "t_first": first_t,
            "t_last": last_data if total else 0.0,
            "rate": steady_rate(samples),
            "cpu_seconds": round(cpu, 3),
        }
        if lat is not None:
            skip = len(lat) // 20  # drop the first 5% (connection warm-up)
            vals = sorted(v / 1e6 for v in lat[skip:])
            result["latency_ms"] = {
                "count": len(vals),
                "p50": round(percentile(vals, 50), 3),
                "p90": round(percentile(vals, 90), 3),
                "p99": round(percentile(vals, 99), 3),
                "max": round(vals[-1], 3) if vals else float("nan"),
            }
            # every sample, in whole µs: runs of a benchmark pool them (a p99 over 5,000
            # samples moves ~10 % between runs; over several runs' samples much less)
            result["latency_us"] = [round(v * 1e3) for v in vals]
        return result
    finally:
        sel.close()
        for sock in socks:
            close_quietly(sock)


# --------------------------------------------------------------------------- publisher


def _ring_slices(ring: memoryview, pkt_len: int, npkts: int, start: int, k: int) -> list[Any]:
    first = start % npkts
    if first + k <= npkts:
        return [ring[first * pkt_len : (first + k) * pkt_len]]
    split = npkts - first
    return [ring[first * pkt_len :], ring[: (k - split) * pkt_len]]


def run_publisher(
    host: str,
    port: int,
    topic: str,
    qos: int,
    messages: int,
    size: int,
    window: int = 50,
    max_seconds: float = 120.0,
    client_id: str = "lg-pub",
) -> dict[str, Any]:
    """Publish ``messages`` payloads of ``size`` bytes as fast as the broker accepts them."""
    sock = open_client(host, port, f"{client_id}-{os.getpid()}")
    deadline = time.monotonic() + max_seconds
    payload = b"x" * size
    cpu0 = _cpu_seconds()
    t0 = time.monotonic()
    sent = 0
    acked = 0
    try:
        set_kernel_timeouts(sock, 1.0, 10.0)
        if qos == 0:
            pkt = publish_packet(topic, payload, 0)
            per_chunk = max(1, CHUNK_BYTES // len(pkt))
            chunk = pkt * per_chunk
            while sent < messages and time.monotonic() < deadline:
                k = min(per_chunk, messages - sent)
                sock.sendall(chunk if k == per_chunk else pkt * k)
                sent += k
        else:
            npkts = min(65535, max(1024, 4 * window))
            ring = memoryview(
                b"".join(publish_packet(topic, payload, qos, i + 1) for i in range(npkts))
            )
            pkt_len = len(ring) // npkts
            first = min(window, messages)
            for part in _ring_slices(ring, pkt_len, npkts, 0, first):
                sock.sendall(part)
            sent = first
            rem = b""
            while acked < messages:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"publisher deadline: {acked}/{messages} acked")
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError(f"broker closed connection after {acked} PUBACKs")
                data = rem + data if rem else data
                if data[0] != 0x40:
                    raise ConnectionError(f"expected PUBACK, got byte {data[0]:#x}")
                k = len(data) // 4
                rem = data[k * 4 :]
                acked += k
                more = min(k, messages - sent)
                if more > 0:
                    for part in _ring_slices(ring, pkt_len, npkts, sent, more):
                        sock.sendall(part)
                    sent += more
        t1 = time.monotonic()
        cpu = _cpu_seconds() - cpu0
    finally:
        close_quietly(sock)
    return {
        "sent": sent,
        "acked": acked,
        "t_start": t0,
        "seconds": round(t1 - t0, 4),
        "send_rate": round(sent / (t1 - t0), 1) if t1 > t0 else 0.0,
        "cpu_seconds": round(cpu, 3),
    }


#: ``"ts"`` = monotonic_ns as 19 digits at payload offset 6, ``"value"`` a slow sine (5 chars)
JSON_STAMP = b'{"ts":%019d,"value":%5.2f,"unit":"C"}'


def run_paced_publisher(
    host: str,
    port: int,
    topic: str,
    qos: int,
    rate: float,
    seconds: float,
    size: int = 64,
    client_id: str = "lg-paced",
    json_stamp: bool = False,
    streams: int = 1,
    replay: list[tuple[str, bytes]] | None = None,
    replay_times: list[float] | None = None,
) -> dict[str, Any]:
    """Publish at a fixed ``rate`` for ``seconds``; payload starts with monotonic_ns (with
    ``json_stamp``: a telemetry-like JSON object, :data:`JSON_STAMP`, ``size`` ignored).
    ``streams`` > 1: message ``i`` goes to ``{topic}/{i % streams}`` (a fleet of sensors,
    each at ``rate / streams``; with ``json_stamp`` each has its own slow sine).
    ``replay``: (topic, payload) pairs sent in turn instead (``topic``, ``size`` and
    ``streams`` ignored), each stamped as ``json_stamp`` reads it (:func:`stamped`);
    ``replay_times`` (ascending seconds from the start, one per pair) keeps their recorded
    spacing, scaled by the caller (``rate`` is then only their mean rate)."""
    head = bytes([0x30 | (qos << 1)])
    if replay:
        frames = [(encode_str(t), stamped(p)) for t, p in replay]

        def frame(i: int) -> tuple[bytes, bytes]:
            tb, (before, after) = frames[i % len(frames)]
            body = before + b"%019d" % time.monotonic_ns() + after
            return head + encode_varint(len(tb) + (2 if qos else 0) + len(body)) + tb, body
    else:
        if json_stamp:
            plen = len(JSON_STAMP % (0, 0.0))

            def payload(i: int) -> bytes:
                k, s = divmod(i, streams)
                return JSON_STAMP % (time.monotonic_ns(), 21.5 + 0.5 * math.sin(k / 200 + s))
        else:
            pad = b"\0" * max(0, size - 8)
            plen = 8 + len(pad)

            def payload(i: int) -> bytes:
                return time.monotonic_ns().to_bytes(8, "big") + pad

        prefixes = []
        for s in range(streams):
            tb = encode_str(topic if streams == 1 else f"{topic}/{s}")
            prefixes.append(head + encode_varint(len(tb) + (2 if qos else 0) + plen) + tb)

        def frame(i: int) -> tuple[bytes, bytes]:
            return prefixes[i % streams], payload(i)

    sock = open_client(host, port, f"{client_id}-{os.getpid()}")
    total = int(rate * seconds)
    if replay_times is not None:
        total = min(total, len(replay_times))

        def due_by(elapsed: float) -> int:
            return bisect_right(replay_times, elapsed, 0, total)

        def due_at(k: int) -> float:
            return replay_times[k] if k < total else seconds
    else:

        def due_by(elapsed: float) -> int:
            return min(total, int(elapsed * rate) + 1)

        def due_at(k: int) -> float:
            return k / rate

    sent = 0
    acked = 0
    rem = b""
    pid = 0
    cpu0 = _cpu_seconds()
    t0 = time.monotonic()
    deadline = t0 + seconds * 3 + 10
    try:
        set_kernel_timeouts(sock, 1.0, 10.0)
        while sent < total:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError("paced publisher fell too far behind")
            due = due_by(now - t0)
            if due > sent:
                out = bytearray()
                for i in range(sent, due):
                    pre, body = frame(i)
                    out += pre
                    if qos:
                        pid = pid % 65535 + 1
                        out += pid.to_bytes(2, "big")
                    out += body
                sock.sendall(out)
                sent = due
            if qos:
                acked, rem = _drain_acks(sock, acked, rem)
            wait = t0 + due_at(sent) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        end = time.monotonic() + 5.0
        while qos and acked < sent and time.monotonic() < end:
            time.sleep(0.01)
            acked, rem = _drain_acks(sock, acked, rem)
        t1 = time.monotonic()
        cpu = _cpu_seconds() - cpu0
    finally:
        close_quietly(sock)
    return {
        "sent": sent,
        "acked": acked,
        "t_start": t0,
        "seconds": round(t1 - t0, 4),
        "cpu_seconds": round(cpu, 3),
    }


def stamped(payload: bytes) -> tuple[bytes, bytes]:
    """Split a recorded payload around a 19-digit ``"ts"`` stamp (the latency subscriber's
    ``json_stamp`` format): a JSON object's own ``"ts"`` value is replaced, anything else
    gets a ``{"ts":...} `` head."""
    if payload.startswith(b'{"ts":'):
        end = payload.find(b",", 6)
        return b'{"ts":', payload[end:] if end > 0 else b"}"
    return b'{"ts":', b"} " + payload


def _drain_acks(sock: socket.socket, acked: int, rem: bytes) -> tuple[int, bytes]:
    """Non-blocking read of pending 4-byte PUBACKs."""
    for _ in range(64):
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not data:
            raise ConnectionError("broker closed connection")
        data = rem + data if rem else data
        k = len(data) // 4
        rem = data[k * 4 :]
        acked += k
    return acked, rem


# --------------------------------------------------------------------------- idle clients


def open_idle_clients(
    host: str,
    port: int,
    count: int,
    topic_prefix: str = "bench/idle",
    batch: int = 100,
    max_seconds: float = 60.0,
) -> list[socket.socket]:
    """Open ``count`` connections, each with one QoS 0 subscription; returns the sockets.

    Connections are opened in batches (CONNECT on the whole batch, then read the
    CONNACKs, then SUBSCRIBE/SUBACK) to stay within the broker's listen backlog.
    """
    _check_loopback(host)
    deadline = time.monotonic() + max_seconds
    socks: list[socket.socket] = []
    try:
        for base in range(0, count, batch):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(socks)}/{count} idle clients connected in time")
            group: list[socket.socket] = []
            for i in range(base, min(count, base + batch)):
                sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
                socks.append(sock)
                group.append(sock)
                sock.sendall(connect_packet(f"lg-idle-{os.getpid()}-{i}"))
            for sock in group:
                body = _expect(sock, 2, "CONNACK")
                if len(body) < 2 or body[1] != 0:
                    raise ConnectionError(f"CONNACK refused: {body.hex()}")
            for j, sock in enumerate(group):
                sock.sendall(subscribe_packet(1, f"{topic_prefix}/{base + j}", 0))
            for sock in group:
                body = _expect(sock, 9, "SUBACK")
                if len(body) < 3 or body[2] >= 0x80:
                    raise ConnectionError(f"SUBACK refused: {body.hex()}")
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: Iterable[socket.socket]) -> None:
    """DISCONNECT and close every socket."""
    for sock in socks:
        close_quietly(sock)


# --------------------------------------------------------------------------- process entry


def worker(conn: Connection, kind: str, kwargs: dict[str, Any]) -> None:
    """``multiprocessing`` target: run one role and send ``{"ok": ..}`` on ``conn``."""
    try:
        if kind == "sub":
            result = run_subscriber(ready=conn, **kwargs)
        elif kind == "pub":
            result = run_publisher(**kwargs)
        elif kind == "paced":
            result = run_paced_publisher(**kwargs)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        conn.send({"ok": True, **result})
    except BaseException as exc:  # report everything, the parent decides
        with contextlib.suppress(OSError):
            conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    """Manual CLI: one subscriber process + one publisher process against a broker."""
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--qos", type=int, choices=(0, 1), default=0)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--topic", default="bench/loadgen")
    args = ap.parse_args(argv)
    ctx = mp.get_context("fork")
    sub_parent, sub_child = ctx.Pipe()
    pub_parent, pub_child = ctx.Pipe()
    sub_kw = {
        "host": args.host,
        "port": args.port,
        "topic": args.topic,
        "qos": args.qos,
        "conns": args.subscribers,
        "expected_per_conn": args.messages,
    }
    pub_kw = {
        "host": args.host,
        "port": args.port,
        "topic": args.topic,
        "qos": args.qos,
        "messages": args.messages,
        "size": args.size,
        "window": args.window,
    }
    sub = ctx.Process(target=worker, args=(sub_child, "sub", sub_kw), daemon=True)
    pub = ctx.Process(target=worker, args=(pub_child, "pub", pub_kw), daemon=True)
    sub.start()
    try:
        if not sub_parent.poll(15) or sub_parent.recv() != "ready":
            print("subscriber not ready", file=sys.stderr)
            return 1
        pub.start()
        res: dict[str, Any] = {}
        if pub_parent.poll(150):
            res["publisher"] = pub_parent.recv()
        if sub_parent.poll(150):
            res["subscriber"] = sub_parent.recv()
        print(json.dumps(res, indent=2))
        return 0
    finally:
        for proc in (pub, sub):
            if proc.pid is not None:
                proc.join(2)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2)


if __name__ == "__main__":
    sys.exit(main())
