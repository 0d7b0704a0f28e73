"""Soak: the gateway for a long time under steady load, upstream flaps and kill -9s.

Issue 12, part D.  One run (default 30 minutes) of::

    200 devices ──► gateway ──► fault proxy ──► upstream Mosquitto ──► subscriber
    (QoS 1, 1,000 msg/s)   (durable queue)  (link cut 60 s        (persistent session,
                                             every 5 min)           counts every id)

with the gateway killed (``SIGKILL`` to its process group) every 10 minutes and restarted
at once on the same data directory.  At the end the load stops, the link is up, the queue
is drained, and the ids the devices got a PUBACK for are compared with the ids that reached
the upstream subscriber.

Processes (all on 127.0.0.1, free ports, every one stopped at the end, also on Ctrl-C,
SIGTERM or an error; worker processes and brokers also die with this program through
``PR_SET_PDEATHSIG``):

* ``upstream``: Mosquitto (``max_queued_messages 0`` = no drops for a slow subscriber,
  no persistence: it is never restarted);
* ``subscriber``: a raw-socket MQTT 3.1.1 client on the upstream, clean session 0,
  ``#`` at QoS 1, which records every arrival of every stamped id (arrival counts per id);
* ``proxy``: ``bench/fault_proxy.py`` between the gateway's uplink and the upstream.
  **"Upstream down" = the link is cut there**: the proxy stops listening (the gateway gets
  ECONNREFUSED) and resets its live connections; after ``--flap-down`` seconds it listens
  again.  The upstream broker and the subscriber's session stay up, so the subscriber
  cannot lose anything itself and every missing id is the gateway's;
* the gateway: ``python -m rapidmq_edge run --config FILE`` with one ``[[upstream]]``
  (MQTT 5, through the proxy), ``[[forward]] filter = "#" qos = 1``, ``[queue] durability
  = "fsync"``, ``sys_interval = 5`` (``status.json`` every 5 s).  It runs from a copy of
  ``rapidmq_edge/`` taken at start (its working directory), so a restart after a kill runs
  the same code even if the tree is edited meanwhile (``--no-snapshot``: the tree);
* devices: ``--device-procs`` processes of asyncio MQTT 3.1.1 clients, one TCP connection
  per device.  Identities, topics and payloads come from ``firmware_sim`` (the seeded
  fleet: ``generate(Scenario(seed, devices))``, each device cycling through its own
  generated messages), but they are **sent by this program's paced QoS 1 client**, because
  the firmware_sim runner is fire-and-forget (mostly QoS 0, no PUBACK tracking, no
  reconnect) and replays realistic periods (10-30 s per reading), not 5 msg/s.  Every
  payload starts with ``{"sid":"DDDD-SSSSSSSSS"`` (device index, sequence; the rest of the
  firmware_sim JSON follows, text lines after ``} ``).  Message ``m`` of the fleet is due at
  ``t0 + m / rate`` and belongs to device ``m % devices``: each device publishes exactly
  ``rate / devices`` msg/s.  A device keeps up to ``--window`` messages in flight; while
  disconnected it buffers (up to ``--device-buffer``, oldest dropped and counted) and
  reconnects by itself (0.1-2 s backoff); messages in flight when the connection broke are
  sent again first (at least once: such an id may arrive twice).

Definitions (the JSON's ``messages``):

* ``acked``: ids a device got a PUBACK for (= durably queued by the gateway).
* ``acked_but_lost``: acked ids that never reached the subscriber by the end (after the
  final drain with the link up).  Must be 0.
* ``duplicates``: arrivals of an already seen id; split into ``from_device_resends`` (the
  device sent the id more than once, after a kill or disconnect before its PUBACK) and
  ``by_gateway`` (more arrivals than the device sent: the uplink resent a message the
  upstream already had, after a cut link or a kill).
* RSS and open fds: ``/proc/<pid>/status`` ``VmRSS`` and ``/proc/<pid>/fd`` of the gateway,
  sampled every ``--sample-interval`` s (the gateway's own ``status.json`` figures are
  recorded beside them).  ``start`` = the first sample after ``--warmup`` s, ``end`` = the
  last sample under load, ``final_idle`` = after the drain (devices still connected).
  Because each kill starts a new process, the same figures are also given per incarnation
  (``per_incarnation``: first sample ``--warmup`` s after its start vs its last sample).
* Event-loop lag: ``status.json`` ``process.loop_lag`` (p99 over the last ~300 s of 0.1 s
  wake-ups) at every sample; reported: the largest p99 sampled, the last, the median.
* Disk: bytes of the data directory (sum of file sizes and allocated blocks), start/end/max;
  free space of its file system (``shutil.disk_usage``).

Usage::

    .venv/bin/python bench/soak.py                          # 30 min, the defaults
    .venv/bin/python bench/soak.py --minutes 60 --out bench/results/soak-60.json
    .venv/bin/python bench/soak.py --minutes 3 --warmup 30 --flap-period 40 \\
        --flap-down 10 --kill-period 60 --kill-offsets 5,25   # ~4 min smoke run

Prints one JSON document on stdout (progress lines on stderr).  Exit status 0 when every
check passed, 2 when one failed, 1 on an error, 130 when interrupted.  Linux only
(``/proc``, ``fork``, ``prctl``).  Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # ``python -m bench.soak``
    from bench import loadgen
    from bench import mqtt_throughput as mt
    from bench import store_forward as sf
    from bench.fault_proxy import FaultProxy
except ImportError:  # ``python bench/soak.py`` (sys.path[0] == bench/)
    import loadgen  # type: ignore[no-redef]
    import mqtt_throughput as mt  # type: ignore[no-redef]
    import store_forward as sf  # type: ignore[no-redef]
    from fault_proxy import FaultProxy  # type: ignore[no-redef]

HOST = mt.HOST
REPO = Path(mt.REPO)
if str(REPO) not in sys.path:  # firmware_sim, when run as ``python bench/soak.py``
    sys.path.insert(1, str(REPO))

GATEWAY_ID = "soak-gw"
UPSTREAM_NAME = "cloud"
SUB_CLIENT_ID = "soak-cloud-sub"
STAMP_HEAD = b'{"sid":"'
STAMP_END = 22  # len('{"sid":"DDDD-SSSSSSSSS')
MAX_DEVICES = 10_000
DEVICE_KEEPALIVE = 60
CONNECT_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1


class SoakError(Exception):
    """The soak cannot go on (a broker did not start, a worker did not answer...)."""


# --------------------------------------------------------------------------- small helpers


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (best effort)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _worker_setup() -> None:
    """In a forked worker: Ctrl-C and SIGTERM are the parent's to handle; die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    die_with_parent()


def stamp(device: int, seq: int, body: bytes, is_json: bool) -> bytes:
    """``body`` with the unique id ``{"sid":"DDDD-SSSSSSSSS"`` in front (JSON kept valid)."""
    head = b'{"sid":"%04d-%09d"' % (device, seq)
    if is_json and body.startswith(b"{") and len(body) > 2:
        return head + b"," + body[1:]
    return head + b"} " + body


def parse_stamp(payload: bytes | memoryview) -> tuple[int, int] | None:
    """``(device, seq)`` of a stamped payload, None for anything else."""
    if len(payload) < STAMP_END or bytes(payload[:8]) != STAMP_HEAD or payload[12] != 0x2D:
        return None
    try:
        return int(bytes(payload[8:12])), int(bytes(payload[13:STAMP_END]))
    except ValueError:
        return None


def proc_rss_fds(pid: int | None) -> tuple[int | None, int | None]:
    """VmRSS (bytes) and the number of open file descriptors of ``pid`` from ``/proc``."""
    if pid is None:
        return None, None
    rss = fds = None
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    with contextlib.suppress(OSError):
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def dir_usage(path: Path) -> tuple[int, int]:
    """(sum of file sizes, allocated bytes) of every file under ``path``."""
    size = alloc = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                size += st.st_size
                alloc += st.st_blocks * 512
    return size, alloc


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _ask(conn: Any, msg: tuple[Any, ...], timeout: float, what: str) -> Any:
    """Send ``msg`` to a worker and return its answer (bounded)."""
    try:
        conn.send(msg)
        if not conn.poll(timeout):
            raise SoakError(f"{what}: no answer within {timeout:.0f} s")
        return conn.recv()
    except (EOFError, OSError, BrokenPipeError) as exc:
        raise SoakError(f"{what}: worker gone ({exc!r})") from exc


def _log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the fleet


@dataclass
class DeviceSpec:
    """One simulated device: index, MQTT client id and its cycle of (topic, body, json?)."""

    index: int
    client_id: str
    kind: str
    templates: list[tuple[bytes, bytes, bool]]


def fleet_specs(seed: int, devices: int, template_seconds: float = 1800.0) -> list[DeviceSpec]:
    """Device identities, topics and payloads of a firmware_sim fleet (MQTT devices)."""
    from firmware_sim.generator import generate
    from firmware_sim.scenario import Scenario

    run = generate(Scenario(seed=seed, devices=devices, duration=template_seconds,
                            outage_rate=0.0, coap_fraction=0.0))
    per: dict[str, list[tuple[bytes, bytes, bool]]] = collections.defaultdict(list)
    for m in run.messages:
        per[m.device].append((loadgen.encode_str(m.topic), m.payload,
                              m.content_format == "json"))
    specs = []
    for i, (dev_id, dev) in enumerate(run.devices.items()):
        templates = per.get(dev_id) or [(
            loadgen.encode_str(dev["topics"]["status"]), b'{"status":"ok"}', True)]
        specs.append(DeviceSpec(i, dev_id, dev["kind"], templates))
    return specs


class _Device:
    """One device connection: paced QoS 1 publishes, PUBACK tracking, reconnects."""

    def __init__(self, spec: DeviceSpec, window: int, buffer: int, host: str,
                 port: int) -> None:
        self.index = spec.index
        self.client_id = spec.client_id
        self.templates = spec.templates
        self.window = window
        self.buffer = buffer
        self.host, self.port = host, port
        self.outbox: collections.deque[int] = collections.deque()
        self.inflight: dict[int, int] = {}
        self.acked = bytearray(4096)
        self.sends = bytearray(4096)
        self.writer: asyncio.StreamWriter | None = None
        self.next_pid = 0
        self.closing = False
        self.produced = self.n_acked = self.dropped = self.resent = 0
        self.connects = self.connect_errors = self.disconnects = 0

    def _grow(self, seq: int) -> None:
        while seq >= len(self.acked):
            self.acked.extend(bytes(len(self.acked)))
            self.sends.extend(bytes(len(self.sends)))

    def produce(self, seq: int) -> None:
        self._grow(seq)
        self.produced += 1
        if len(self.outbox) >= self.buffer:
            self.outbox.popleft()
            self.dropped += 1
        self.outbox.append(seq)
        self.flush()

    def _packet(self, seq: int, pid: int) -> bytes:
        topic, body, is_json = self.templates[seq % len(self.templates)]
        rest = topic + pid.to_bytes(2, "big") + stamp(self.index, seq, body, is_json)
        return b"\x32" + loadgen.encode_varint(len(rest)) + rest

    def _pid(self) -> int:
        while True:
            self.next_pid = self.next_pid % 65535 + 1
            if self.next_pid not in self.inflight:
                return self.next_pid

    def flush(self) -> None:
        w = self.writer
        if w is None or not self.outbox or len(self.inflight) >= self.window:
            return
        out = bytearray()
        while self.outbox and len(self.inflight) < self.window:
            seq = self.outbox.popleft()
            pid = self._pid()
            self.inflight[pid] = seq
            if self.sends[seq]:
                self.resent += 1
            if self.sends[seq] < 255:
                self.sends[seq] += 1
            out += self._packet(seq, pid)
        w.write(out)

    async def run(self) -> None:
        """Connect, publish, reconnect after any loss, until ``closing``."""
        backoff = 0.1
        while not self.closing:
            ok = await self._session()
            if self.inflight:  # not acknowledged: send again first, oldest first
                self.outbox.extendleft(sorted(self.inflight.values(), reverse=True))
                self.inflight.clear()
            if self.closing:
                break
            backoff = 0.1 if ok else min(2.0, backoff * 2)
            await asyncio.sleep(backoff * (0.5 + random.random()))

    async def _session(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self.connect_errors += 1
            return False
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(loadgen.connect_packet(self.client_id, DEVICE_KEEPALIVE))
            ptype, body = await asyncio.wait_for(_read_packet(reader), CONNECT_TIMEOUT)
            if ptype != 2 or len(body) < 2 or body[1] != 0:
                self.connect_errors += 1
                return False
            self.connects += 1
            self.writer = writer
            self.flush()
            while not self.closing:
                try:
                    ptype, body = await asyncio.wait_for(_read_packet(reader),
                                                         DEVICE_KEEPALIVE)
                except TimeoutError:
                    if self.inflight:  # nothing acknowledged for a minute: start over
                        break
                    writer.write(b"\xc0\x00")  # PINGREQ
                    continue
                if ptype == 4 and len(body) >= 2:
                    seq = self.inflight.pop((body[0] << 8) | body[1], None)
                    if seq is not None and not self.acked[seq]:
                        self.acked[seq] = 1
                        self.n_acked += 1
                    self.flush()
            return True
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return self.writer is writer
        finally:
            if self.writer is writer:
                self.writer = None
                self.disconnects += 1
            writer.transport.abort()

    def disconnect(self) -> None:
        self.closing = True
        w, self.writer = self.writer, None
        if w is not None:
            with contextlib.suppress(Exception):
                w.write(loadgen.DISCONNECT)
                w.close()


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, mult = 0, 1
    for _ in range(4):
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) * mult
        if not byte & 0x80:
            break
        mult *= 128
    body = await reader.readexactly(length) if length else b""
    return first >> 4, body


def _fleet_stats(devices: list[_Device]) -> dict[str, int]:
    return {
        "produced": sum(d.produced for d in devices),
        "acked": sum(d.n_acked for d in devices),
        "inflight": sum(len(d.inflight) for d in devices),
        "outbox": sum(len(d.outbox) for d in devices),
        "connected": sum(d.writer is not None for d in devices),
        "connects": sum(d.connects for d in devices),
        "connect_errors": sum(d.connect_errors for d in devices),
        "disconnects": sum(d.disconnects for d in devices),
        "dropped_at_device": sum(d.dropped for d in devices),
        "resent": sum(d.resent for d in devices),
    }


async def _fleet_main(conn: Any, specs: list[DeviceSpec], port: int, rate: float,
                      total_devices: int, window: int, buffer: int) -> None:
    loop = asyncio.get_running_loop()
    cmds: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def on_cmd() -> None:
        try:
            cmds.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            cmds.put_nowait(("exit",))

    loop.add_reader(conn.fileno(), on_cmd)
    devices = [_Device(s, window, buffer, HOST, port) for s in specs]
    mine = {d.index: d for d in devices}
    conn.send(("ready", len(devices)))
    cmd = await cmds.get()
    if cmd[0] != "go":
        return
    t0 = float(cmd[1])
    tasks = [asyncio.create_task(d.run()) for d in devices]

    async def tick() -> None:
        m = 0
        while True:
            due = int((time.monotonic() - t0) * rate) + 1
            while m < due:
                dev = mine.get(m % total_devices)
                if dev is not None:
                    dev.produce(m // total_devices)
                m += 1
            await asyncio.sleep(max(0.005, t0 + m / rate - time.monotonic()))

    ticker = asyncio.create_task(tick())
    try:
        while True:
            cmd = await cmds.get()
            if cmd[0] == "stats":
                conn.send(("stats", _fleet_stats(devices)))
            elif cmd[0] == "stop":  # stop producing, wait for every PUBACK (bounded)
                ticker.cancel()
                deadline = time.monotonic() + float(cmd[1])
                while (any(d.outbox or d.inflight for d in devices)
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.1)
                conn.send(("report", {
                    "stats": _fleet_stats(devices),
                    "devices": {d.index: {"client_id": d.client_id, "produced": d.produced,
                                          "acked": bytes(d.acked), "sends": bytes(d.sends)}
                                for d in devices},
                }))
            else:
                break
    finally:
        ticker.cancel()
        for d in devices:
            d.disconnect()
        await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, ticker, return_exceptions=True)


def fleet_worker(conn: Any, specs: list[DeviceSpec], port: int, rate: float,
                 total_devices: int, window: int, buffer: int) -> None:
    """Process entry: run ``specs`` against the gateway on ``port``, driven by ``conn``."""
    _worker_setup()
    try:
        asyncio.run(_fleet_main(conn, specs, port, rate, total_devices, window, buffer))
    except BaseException as exc:  # report, the parent decides
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------- subscriber


class _Counter:
    """Arrivals per stamped id (device -> bytearray of counts, capped at 255)."""

    def __init__(self, devices: int) -> None:
        self.seen = [bytearray(4096) for _ in range(devices)]
        self.total = self.unique = self.dups = self.other = self.unknown = 0
        self.last_arrival = 0.0

    def add(self, payload: memoryview) -> None:
        sid = parse_stamp(payload)
        if sid is None:
            self.other += 1
            return
        dev, seq = sid
        if dev >= len(self.seen):
            self.unknown += 1
            return
        arr = self.seen[dev]
        while seq >= len(arr):
            arr.extend(bytes(len(arr)))
        self.total += 1
        if arr[seq]:
            self.dups += 1
        else:
            self.unique += 1
        if arr[seq] < 255:
            arr[seq] += 1
        self.last_arrival = time.monotonic()

    def scan(self, buf: bytes, acks: bytearray) -> int:
        """Count the complete PUBLISHes in ``buf``; PUBACKs into ``acks``; bytes used."""
        n, pos = len(buf), 0
        mv = memoryview(buf)
        while pos + 2 <= n:
            b0 = buf[pos]
            hp, rl, mult = pos + 1, 0, 1
            while True:
                if hp >= n:
                    return pos
                byte = buf[hp]
                hp += 1
                rl += (byte & 0x7F) * mult
                if not byte & 0x80:
                    break
                mult *= 128
            end = hp + rl
            if end > n:
                return pos
            if b0 >> 4 == 3:
                p = hp + 2 + ((buf[hp] << 8) | buf[hp + 1])
                if b0 & 0x06:
                    acks += b"\x40\x02" + buf[p : p + 2]
                    p += 2
                self.add(mv[p:end])
            pos = end
        return pos


def _sub_connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = (loadgen.encode_str("MQTT") + bytes([4, 0x00]) + (0).to_bytes(2, "big")
                + loadgen.encode_str(SUB_CLIENT_ID))  # clean session 0, no keep-alive
        sock.sendall(b"\x10" + loadgen.encode_varint(len(body)) + body)
        ack = loadgen._expect(sock, 2, "CONNACK")
        if len(ack) < 2 or ack[1] != 0:
            raise ConnectionError(f"CONNACK refused: {ack.hex()}")
        if not ack[0] & 1:  # no session yet: subscribe (a kept session keeps it)
            loadgen.subscribe(sock, "#", 1)
        loadgen.set_kernel_timeouts(sock, 0.2)
    except BaseException:
        sock.close()
        raise
    return sock


def subscriber_worker(conn: Any, port: int, devices: int) -> None:
    """Process entry: count every stamped id arriving on the upstream at ``port``."""
    _worker_setup()
    c = _Counter(devices)
    sock: socket.socket | None = None
    rem = b""
    connects = 0
    errors: list[str] = []
    try:
        while True:
            if conn.poll():
                cmd = conn.recv()
                summary = {"total": c.total, "unique": c.unique, "duplicates": c.dups,
                           "other": c.other, "unknown_device": c.unknown,
                           "last_arrival": c.last_arrival, "connects": connects,
                           "connected": sock is not None, "errors": errors[-5:]}
                if cmd[0] == "stats":
                    conn.send(("stats", summary))
                elif cmd[0] == "report":
                    conn.send(("report", {**summary, "seen": [bytes(a) for a in c.seen]}))
                else:
                    break
            if sock is None:
                try:
                    sock = _sub_connect(port)
                    connects += 1
                    rem = b""
                    if connects == 1:
                        conn.send(("ready", None))
                except (OSError, ConnectionError) as exc:
                    errors.append(f"connect: {exc!r}"[:200])
                    time.sleep(0.5)
                continue
            try:
                data = sock.recv(loadgen.RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                errors.append(f"recv: {exc!r}"[:200])
                data = b""
            if not data:
                sock.close()
                sock = None
                continue
            buf = rem + data if rem else data
            acks = bytearray()
            used = c.scan(buf, acks)
            rem = buf[used:]
            if acks:
                try:
                    sock.sendall(acks)
                except OSError:
                    sock.close()
                    sock = None
    finally:
        if sock is not None:
            loadgen.close_quietly(sock)


# --------------------------------------------------------------------------- link proxy


async def _proxy_main(conn: Any, listen_port: int, target_port: int) -> None:
    proxy = FaultProxy(HOST, target_port)
    await proxy.start(HOST, listen_port)
    up = True
    conn.send(("ready", proxy.port))
    try:
        while True:
            if not conn.poll():
                await asyncio.sleep(0.05)
                continue
            cmd = conn.recv()[0]
            if cmd == "down" and up:
                await proxy.close()
                up = False
            elif cmd == "up" and not up:
                for _ in range(50):  # the port may be busy for a moment
                    try:
                        await proxy.start(HOST, listen_port)
                        break
                    except OSError:
                        await asyncio.sleep(0.1)
                else:
                    conn.send(("error", f"cannot listen on {listen_port} again"))
                    continue
                up = True
            elif cmd == "exit":
                break
            conn.send(("ok", {"up": up, "accepted": proxy.accepted}))
    finally:
        if up:
            await proxy.close()


def proxy_worker(conn: Any, listen_port: int, target_port: int) -> None:
    """Process entry: the gateway <-> upstream link, cut and restored on command."""
    _worker_setup()
    try:
        asyncio.run(_proxy_main(conn, listen_port, target_port))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


# --------------------------------------------------------------------------- services


@dataclass
class Service:
    """A broker subprocess in its own session: start (bounded), kill -9, stop."""

    name: str
    command: list[str]
    cwd: Path
    port: int
    start_timeout: float
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-1000:]

    def start(self) -> float:
        """Start and wait until an MQTT CONNECT succeeds; seconds it took."""
        t0 = time.monotonic()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== start {self.starts} at {time.time():.3f}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.command, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env,
                    start_new_session=True, preexec_fn=die_with_parent)
            except OSError as exc:
                raise SoakError(f"{self.name}: cannot start {self.command[0]}: {exc}") from exc
        deadline = t0 + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                rc = self.proc.returncode if self.proc else None
                raise SoakError(f"{self.name} exited with {rc} at start: {self.log_tail()}")
            try:
                sock = loadgen.open_client(HOST, self.port, "soak-probe", timeout=2.0)
                loadgen.close_quietly(sock)
                return time.monotonic() - t0
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)
        self.stop()
        raise SoakError(f"{self.name} not accepting MQTT after {self.start_timeout:.0f} s "
                        f"({last}): {self.log_tail()}")

    def kill9(self) -> None:
        """SIGKILL the whole process group and reap it."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 10 s."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None


def gateway_toml(data_dir: Path, port: int, up_port: int, args: argparse.Namespace) -> str:
    """The gateway's configuration for the soak."""
    return (
        "[gateway]\n"
        f'id = "{GATEWAY_ID}"\n'
        f'data_dir = "{data_dir}"\n'
        'log_level = "warning"\n'
        "[mqtt]\n"
        f'listen = ["tcp://{HOST}:{port}"]\n'
        "sys_interval = 5.0\n"
        "[auth]\n"
        "allow_anonymous = true\n"
        "[[upstream]]\n"
        f'name = "{UPSTREAM_NAME}"\n'
        f'urls = ["mqtt://{HOST}:{up_port}"]\n'
        + (f"reconnect_max_s = {args.reconnect_max_s}\n" if args.reconnect_max_s else "")
        + "[[forward]]\n"
        'filter = "#"\n'
        f'upstream = "{UPSTREAM_NAME}"\n'
        "qos = 1\n"
        "[queue]\n"
        f'durability = "{args.durability}"\n'
    )


def snapshot_code(dest: Path) -> str:
    """Copy ``rapidmq_edge/`` to ``dest``; a short hash of its files."""
    src = REPO / "rapidmq_edge"
    shutil.copytree(src, dest / "rapidmq_edge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    h = hashlib.sha256()
    for p in sorted((dest / "rapidmq_edge").rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(dest)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- schedule


def schedule(args: argparse.Namespace) -> list[tuple[float, str]]:
    """(seconds after load start, "flap_down" | "flap_up" | "kill"), in time order."""
    dur = args.minutes * 60
    ev: list[tuple[float, str]] = []
    if args.flap_period > 0 and args.flap_down > 0:
        k = 1
        while k * args.flap_period + args.flap_down < dur:
            ev += [(k * args.flap_period, "flap_down"),
                   (k * args.flap_period + args.flap_down, "flap_up")]
            k += 1
    if args.kill_period > 0:
        offsets = args.kill_offsets or [0.0]
        k = 1
        while k * args.kill_period + offsets[(k - 1) % len(offsets)] < dur:
            ev.append((k * args.kill_period + offsets[(k - 1) % len(offsets)], "kill"))
            k += 1
    order = {"flap_up": 0, "kill": 1, "flap_down": 2}
    return sorted(ev, key=lambda e: (e[0], order[e[1]]))


# --------------------------------------------------------------------------- the run


@dataclass
class Soak:
    """Everything one run starts, so that ``cleanup`` can stop all of it."""

    args: argparse.Namespace
    tmp: Path
    services: list[Service] = field(default_factory=list)
    workers: list[tuple[Any, Any, str]] = field(default_factory=list)  # (proc, conn, name)
    gateway: Service | None = None
    sub: Any = None
    proxy: Any = None
    fleets: list[Any] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    incarnation: int = 1
    inc_started: dict[int, float] = field(default_factory=dict)
    t0: float = 0.0
    link_up: bool = True
    gw_cpu_s: float = 0.0
    data_dir: Path = Path()

    def spawn(self, name: str, target: Callable[..., None], *args: Any) -> Any:
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, *args), name=f"soak-{name}",
                           daemon=True)
        proc.start()
        child.close()
        self.workers.append((proc, parent, name))
        return parent

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def event(self, kind: str, rss: int | None = None, **kw: Any) -> None:
        """Record ``kind`` now, with the gateway's RSS (``rss``: measured by the caller)."""
        gw = self.gateway
        if rss is None:
            rss, _ = proc_rss_fds(gw.pid if gw is not None and gw.alive() else None)
        self.events.append({"t": self.now(), "event": kind, **kw, "rss_mb": _mb(rss)})

    def set_link(self, up: bool) -> None:
        res = _ask(self.proxy, ("up" if up else "down",), 15, "proxy")
        if res[0] != "ok":
            raise SoakError(f"proxy: {res[1]}")
        self.link_up = up

    def status(self) -> dict[str, Any]:
        """``status.json`` if it is the running gateway's and recent, else {}."""
        st = sf.read_status(self.data_dir)
        gw = self.gateway
        fresh = time.time() - float(st.get("written_at") or 0) < 15
        if gw is None or st.get("pid") != gw.pid or not fresh:
            return {}
        return st

    def sample(self, tag: str = "") -> dict[str, Any]:
        gw = self.gateway
        pid = gw.pid if gw is not None and gw.alive() else None
        rss, fds = proc_rss_fds(pid)
        size, alloc = dir_usage(self.data_dir)
        st = self.status()
        proc = st.get("process") or {}
        lag = proc.get("loop_lag") or {}
        fwd = st.get("forwarding") or {}
        up = (fwd.get("upstreams") or {}).get(UPSTREAM_NAME) or {}
        fleet = [_ask(f, ("stats",), 10, "devices")[1] for f in self.fleets]
        sub = _ask(self.sub, ("stats",), 10, "subscriber")[1]
        s: dict[str, Any] = {
            "t": self.now(), "inc": self.incarnation,
            "inc_age": round(time.monotonic() - self.inc_started[self.incarnation], 1),
            "pid": pid, "rss": rss, "fds": fds,
            "cpu_s": round(self.gw_cpu_s + (mt.cpu_seconds([pid]) if pid else 0.0), 2),
            "status_rss": proc.get("rss_bytes"), "status_fds": proc.get("open_fds"),
            "lag_p50_ms": lag.get("p50_ms"), "lag_p99_ms": lag.get("p99_ms"),
            "lag_max_ms": lag.get("max_ms"),
            "disk_free": _disk_free(self.data_dir),
            "queued": fwd.get("queued"), "uplink_connected": up.get("connected"),
            "uplink_inflight": up.get("inflight"),
            "clients": (st.get("broker") or {}).get("clients/connected"),
            "data_bytes": size, "data_alloc_bytes": alloc, "link_up": self.link_up,
            "produced": sum(f["produced"] for f in fleet),
            "acked": sum(f["acked"] for f in fleet),
            "devices_connected": sum(f["connected"] for f in fleet),
            "device_outbox": sum(f["outbox"] for f in fleet),
            "received": sub["total"], "received_unique": sub["unique"],
        }
        if tag:
            s["tag"] = tag
        self.samples.append(s)
        return s

    def kill_gateway(self) -> None:
        gw = self.gateway
        assert gw is not None
        st = self.status()
        pid = gw.pid
        cpu = mt.cpu_seconds([pid]) if pid else 0.0
        rss, fds = proc_rss_fds(pid)
        t_kill = time.monotonic()
        gw.kill9()
        self.gw_cpu_s += cpu
        restart_s = gw.start()
        self.incarnation += 1
        self.inc_started[self.incarnation] = time.monotonic()
        self.event("kill", rss=rss, pid=pid, fds=fds,
                   queued_last_status=(st.get("forwarding") or {}).get("queued"),
                   link_up=self.link_up, restart_s=round(time.monotonic() - t_kill, 2),
                   start_s=round(restart_s, 2), new_pid=gw.pid)

    def restart_dead_gateway(self) -> None:
        gw = self.gateway
        assert gw is not None and gw.proc is not None
        rc = gw.proc.returncode
        self.event("gateway_exited", pid=gw.pid, returncode=rc, log=gw.log_tail())
        gw.proc = None
        gw.start()
        self.incarnation += 1
        self.inc_started[self.incarnation] = time.monotonic()

    def cleanup(self) -> None:
        for _proc, conn, _name in self.workers:
            with contextlib.suppress(Exception):
                conn.send(("exit",))
        for proc, conn, _name in self.workers:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            with contextlib.suppress(Exception):
                conn.close()
        self.workers.clear()
        for svc in reversed(self.services):
            svc.stop()


def _wait_ready(conn: Any, what: str, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise SoakError(f"{what}: not ready within {timeout:.0f} s")
    msg = conn.recv()
    if msg[0] != "ready":
        raise SoakError(f"{what}: {msg[1]}")
    return msg[1]


def run(soak: Soak) -> dict[str, Any]:
    """Start everything, run the schedule, drain, and return the raw outcome."""
    args, tmp = soak.args, soak.tmp
    out: dict[str, Any] = {}
    # -- processes: upstream, subscriber, link proxy, gateway, devices
    up_port, proxy_port, gw_port = mt.free_port(), mt.free_port(), mt.free_port()
    while len({up_port, proxy_port, gw_port}) < 3:
        proxy_port, gw_port = mt.free_port(), mt.free_port()
    (tmp / "upstream").mkdir()
    (tmp / "upstream" / "mosquitto.conf").write_text(
        sf.mosquitto_conf(up_port, "persistence false\nmax_connections -1\n"))
    upstream = Service("upstream", [args.mosquitto, "-c", str(tmp / "upstream/mosquitto.conf")],
                       tmp / "upstream", up_port, 15.0)
    soak.services.append(upstream)
    upstream.start()
    soak.sub = soak.spawn("subscriber", subscriber_worker, up_port, args.devices)
    _wait_ready(soak.sub, "subscriber", 20)
    soak.proxy = soak.spawn("proxy", proxy_worker, proxy_port, up_port)
    _wait_ready(soak.proxy, "proxy", 20)

    gw_dir = tmp / "gateway"
    gw_dir.mkdir()
    out["code"] = {"snapshot": not args.no_snapshot, **sf.git_state()}
    if not args.no_snapshot:
        out["code"]["snapshot_sha256_16"] = snapshot_code(gw_dir)
    soak.data_dir = gw_dir / "data"
    conf = gw_dir / "gateway.toml"
    conf.write_text(gateway_toml(soak.data_dir, gw_port, proxy_port, args))
    env = dict(os.environ)
    if args.no_snapshot:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    gw = Service("gateway", [args.python, "-m", "rapidmq_edge", "run", "--config", str(conf)],
                 gw_dir, gw_port, args.gateway_start_timeout, env=env)
    soak.services.append(gw)
    soak.gateway = gw
    gw.start()

    specs = fleet_specs(args.seed, args.devices)
    nproc = max(1, min(args.device_procs, args.devices))
    for p in range(nproc):
        soak.fleets.append(soak.spawn(
            f"devices{p}", fleet_worker, specs[p::nproc], gw_port, args.rate, args.devices,
            args.window, args.device_buffer))
    for f in soak.fleets:
        _wait_ready(f, "devices", 30)
    out["fleet"] = {
        "devices": len(specs), "processes": nproc,
        "kinds": dict(collections.Counter(s.kind for s in specs)),
        "templates": sum(len(s.templates) for s in specs),
        "payload_bytes_mean": round(statistics.mean(
            len(b) for s in specs for _, b, _ in s.templates) + STAMP_END + 1, 1),
    }

    # -- the load, with the schedule
    plan = schedule(args)
    out["schedule"] = [{"t": t, "event": e} for t, e in plan]
    soak.t0 = time.monotonic() + 1.0
    soak.inc_started[1] = soak.t0
    for f in soak.fleets:
        f.send(("go", soak.t0))
    duration = args.minutes * 60
    next_sample = soak.t0 + min(args.sample_interval, 5.0)
    next_progress = soak.t0 + args.progress_interval
    _log(f"load started: {args.devices} devices, {args.rate:g} msg/s, {args.minutes:g} min, "
         f"{sum(e == 'kill' for _, e in plan)} kills, "
         f"{sum(e == 'flap_down' for _, e in plan)} flaps; data in {soak.data_dir}")
    while True:
        now = time.monotonic()
        el = now - soak.t0
        if el >= duration:
            break
        if not upstream.alive():
            raise SoakError(f"upstream Mosquitto died: {upstream.log_tail()}")
        if not gw.alive():
            soak.restart_dead_gateway()
        while plan and plan[0][0] <= el:
            _, kind = plan.pop(0)
            if kind == "kill":
                soak.kill_gateway()
                _log(f"t={soak.now():.0f}s kill -9 #{soak.incarnation - 1}: "
                     f"{soak.events[-1]}")
            else:
                st = soak.status()
                soak.set_link(kind == "flap_up")
                soak.event(kind, queued_last_status=(st.get("forwarding") or {}).get("queued"))
                _log(f"t={soak.now():.0f}s link {'up' if soak.link_up else 'down'}")
        if now >= next_sample:
            s = soak.sample()
            next_sample += args.sample_interval
            if now >= next_progress:
                next_progress += args.progress_interval
                _log(f"t={s['t']:.0f}s inc={s['inc']} rss={(s['rss'] or 0) / 2**20:.1f}MB "
                     f"fds={s['fds']} lag_p99={s['lag_p99_ms']}ms queued={s['queued']} "
                     f"link={'up' if s['link_up'] else 'down'} produced={s['produced']} "
                     f"acked={s['acked']} received={s['received']} "
                     f"devices={s['devices_connected']} load={os.getloadavg()[0]:.2f}")
        wake = min(next_sample, soak.t0 + (plan[0][0] if plan else duration),
                   soak.t0 + duration, time.monotonic() + 1.0)
        time.sleep(max(0.0, wake - time.monotonic()))

    # -- end of the load: last sample under load, then stop, drain, final sample
    if not gw.alive():
        soak.restart_dead_gateway()
    soak.sample("end")
    if not soak.link_up:
        soak.set_link(True)
        soak.event("flap_up", note="end of run")
    reports = [_ask(f, ("stop", args.stop_timeout), args.stop_timeout + 30, "devices")
               for f in soak.fleets]
    for r in reports:
        if r[0] != "report":
            raise SoakError(f"devices: {r[1]}")
    acked_total = sum(r[1]["stats"]["acked"] for r in reports)
    _log(f"load stopped at t={soak.now():.0f}s; {acked_total} acked; draining")
    t_drain = time.monotonic()
    deadline = t_drain + args.drain_timeout
    last_total, last_change = -1, time.monotonic()
    drained = False
    while time.monotonic() < deadline:
        if not gw.alive():
            soak.restart_dead_gateway()
        sub = _ask(soak.sub, ("stats",), 10, "subscriber")[1]
        if sub["total"] != last_total:
            last_total, last_change = sub["total"], time.monotonic()
        st = soak.status()
        fwd = st.get("forwarding") or {}
        upst = (fwd.get("upstreams") or {}).get(UPSTREAM_NAME) or {}
        empty = fwd.get("queued") == 0 and not upst.get("inflight")
        if empty and time.monotonic() - last_change >= args.quiet:
            drained = True
            break
        time.sleep(0.5)
    out["drain"] = {"drained": drained, "seconds": round(time.monotonic() - t_drain, 1)}
    soak.sample("final_idle")
    subrep = _ask(soak.sub, ("report",), 60, "subscriber")[1]
    out["reports"] = [r[1] for r in reports]
    out["subscriber"] = subrep
    if gw.pid:
        soak.gw_cpu_s += mt.cpu_seconds([gw.pid])
    out["gateway_cpu_s"] = round(soak.gw_cpu_s, 1)
    out["gateway_log"] = log_summary(gw.log_path)
    return out


# --------------------------------------------------------------------------- results


def log_summary(path: Path) -> dict[str, Any]:
    """Counts of WARNING/ERROR/Traceback lines in the gateway's log and a few of them."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    keys = ("Traceback", "ERROR", "CRITICAL", "WARNING")
    counts = {k: sum(k in ln for ln in lines) for k in keys}
    seen: dict[str, str] = {}  # message without its timestamp -> first line
    for ln in lines:
        if any(k in ln for k in keys) and not ln.startswith("==="):
            parts = ln.split(" ", 2)
            key = parts[2] if len(parts) == 3 and ln[:2].isdigit() else ln
            seen.setdefault(key[:100], ln[:240])
    return {"lines": len(lines), **counts, "first_distinct": list(seen.values())[:8]}


def messages_outcome(reports: list[dict[str, Any]], sub: dict[str, Any],
                     max_ids: int = 20) -> dict[str, Any]:
    """Compare what devices got PUBACKs for with what the subscriber received."""
    seen: list[bytes] = sub["seen"]
    produced = sent = acked = lost = dups = dup_resent = dup_gateway = 0
    resent_ids = unacked_delivered = unacked_missing = never_sent = received = 0
    lost_ids: list[str] = []
    sent_max = 0
    for rep in reports:
        for idx, d in rep["devices"].items():
            a, s = d["acked"], d["sends"]
            got = seen[idx] if idx < len(seen) else b""
            produced += d["produced"]
            for seq in range(d["produced"]):
                n_sent = s[seq]
                n_got = got[seq] if seq < len(got) else 0
                received += n_got
                if not n_sent:
                    never_sent += 1
                    continue
                sent += 1
                sent_max = max(sent_max, n_sent)
                if n_sent > 1:
                    resent_ids += 1
                if n_got > 1:
                    dups += n_got - 1
                    from_dev = min(n_got, n_sent) - 1
                    dup_resent += from_dev
                    dup_gateway += n_got - 1 - from_dev
                if a[seq]:
                    acked += 1
                    if not n_got:
                        lost += 1
                        if len(lost_ids) < max_ids:
                            lost_ids.append(f"{d['client_id']}#{idx:04d}-{seq:09d}")
                elif n_got:
                    unacked_delivered += 1
                else:
                    unacked_missing += 1
    return {
        "produced": produced,
        "sent_ids": sent,
        "never_sent_dropped_at_device": never_sent,
        "resent_ids": resent_ids,
        "acked": acked,
        "received": sub["total"],
        "received_unique": sub["unique"],
        "received_of_produced_ids": received,
        "acked_but_lost": lost,
        "acked_but_lost_ids": lost_ids,
        "duplicates": sub["duplicates"],
        "duplicates_from_device_resends": dup_resent,
        "duplicates_by_gateway": dup_gateway,
        "not_acked_but_delivered": unacked_delivered,
        "not_acked_not_delivered": unacked_missing,
        "unknown_ids": sub.get("unknown_device", 0),
        "other_messages_upstream": sub["other"],
        "subscriber_connects": sub["connects"],
    }


def _mb(v: float | None) -> float | None:
    return round(v / 2**20, 1) if v is not None else None


def _growth(a: float | None, b: float | None) -> float | None:
    return round(100.0 * (b - a) / a, 2) if a and b is not None else None


def resources(samples: list[dict[str, Any]], warmup: float,
              events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """RSS, fds, loop lag and disk from the periodic samples."""
    load = [s for s in samples if s.get("tag") != "final_idle" and s["rss"] is not None]
    warm = [s for s in load if s["t"] >= warmup]
    start = warm[0] if warm else (load[0] if load else None)
    # a second baseline: 60 s after the first outage ended (its backlog drained), when the
    # queue's row cache and SQLite's page cache have been filled once
    first_up = next((e["t"] for e in events or [] if e["event"] == "flap_up"), None)
    post = next((s for s in load if first_up is not None and s["t"] >= first_up + 60), None)
    end = next((s for s in reversed(samples) if s.get("tag") == "end"), None) or (
        load[-1] if load else None)
    idle = next((s for s in samples if s.get("tag") == "final_idle"), None)
    rss_all = [s["rss"] for s in samples if s["rss"] is not None]
    per_inc = []
    for inc in sorted({s["inc"] for s in load}):
        ss = [s for s in load if s["inc"] == inc]
        w = [s for s in ss if s["inc_age"] >= warmup]
        if not w:
            continue
        per_inc.append({
            "incarnation": inc, "from_t": ss[0]["t"], "to_t": ss[-1]["t"],
            "rss_warm_mb": _mb(w[0]["rss"]), "rss_last_mb": _mb(ss[-1]["rss"]),
            "rss_max_mb": _mb(max(s["rss"] for s in ss)),
            "rss_growth_pct": _growth(w[0]["rss"], ss[-1]["rss"]),
            "fds_warm": w[0]["fds"], "fds_last": ss[-1]["fds"],
        })
    lags = [s for s in samples if s.get("lag_p99_ms") is not None]
    worst = max(lags, key=lambda s: s["lag_p99_ms"]) if lags else None
    disk = [s["data_bytes"] for s in samples]
    alloc = [s["data_alloc_bytes"] for s in samples]
    return {
        "rss": {
            "start_mb": _mb(start["rss"]) if start else None,
            "start_t": start["t"] if start else None,
            "end_mb": _mb(end["rss"]) if end else None,
            "end_t": end["t"] if end else None,
            "max_mb": _mb(max(rss_all)) if rss_all else None,
            "growth_pct": _growth(start["rss"], end["rss"]) if start and end else None,
            "final_idle_mb": _mb(idle["rss"]) if idle else None,
            "after_first_outage_mb": _mb(post["rss"]) if post else None,
            "after_first_outage_t": post["t"] if post else None,
            "growth_pct_from_after_first_outage": (
                _growth(post["rss"], end["rss"]) if post and end and post is not end
                else None),
            "status_json_end_mb": _mb(end.get("status_rss")) if end else None,
            "per_incarnation": per_inc,
        },
        "fds": {
            "start": start["fds"] if start else None,
            "end": end["fds"] if end else None,
            "max": max((s["fds"] for s in samples if s["fds"] is not None), default=None),
            "final_idle": idle["fds"] if idle else None,
            "devices_connected_start_end": [start["devices_connected"] if start else None,
                                            end["devices_connected"] if end else None],
            "uplink_connected_start_end": [start["uplink_connected"] if start else None,
                                           end["uplink_connected"] if end else None],
            "status_json_end": end.get("status_fds") if end else None,
        },
        "loop_lag_ms": {
            "p99_max": worst["lag_p99_ms"] if worst else None,
            "p99_max_at_t": worst["t"] if worst else None,
            "p99_last": lags[-1]["lag_p99_ms"] if lags else None,
            "p99_median_of_samples": (round(statistics.median(
                s["lag_p99_ms"] for s in lags), 3) if lags else None),
            "p50_last": lags[-1]["lag_p50_ms"] if lags else None,
            "max_max": max((s["lag_max_ms"] or 0 for s in lags), default=None),
            "samples": len(lags),
        },
        "disk": {
            "data_dir_start_mb": _mb(start["data_bytes"]) if start else None,
            "data_dir_end_mb": _mb(end["data_bytes"]) if end else None,
            "data_dir_max_mb": _mb(max(disk)) if disk else None,
            "data_dir_final_idle_mb": _mb(idle["data_bytes"]) if idle else None,
            "allocated_max_mb": _mb(max(alloc)) if alloc else None,
            "fs_free_start_gb": (round(start["disk_free"] / 2**30, 2)
                                 if start and start.get("disk_free") else None),
            "fs_free_end_gb": (round(end["disk_free"] / 2**30, 2)
                               if end and end.get("disk_free") else None),
        },
    }


# --------------------------------------------------------------------------- main


def _offsets(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line of the soak."""
    ap = argparse.ArgumentParser(description=(__doc__ or "soak").splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0,
                    help="duration of the load in minutes (30)")
    ap.add_argument("--rate", type=float, default=1000.0, help="fleet msg/s in total (1000)")
    ap.add_argument("--devices", type=int, default=200, help="simulated devices (200)")
    ap.add_argument("--device-procs", type=int, default=2,
                    help="processes the devices are spread over (2)")
    ap.add_argument("--window", type=int, default=20, help="QoS 1 in flight per device (20)")
    ap.add_argument("--device-buffer", type=int, default=3000,
                    help="messages a disconnected device buffers, oldest dropped (3000)")
    ap.add_argument("--seed", type=int, default=1, help="firmware_sim fleet seed (1)")
    ap.add_argument("--flap-period", type=float, default=300.0,
                    help="seconds between link cuts (300; 0 = none)")
    ap.add_argument("--flap-down", type=float, default=60.0, help="seconds a cut lasts (60)")
    ap.add_argument("--kill-period", type=float, default=600.0,
                    help="seconds between kill -9s of the gateway (600; 0 = none)")
    ap.add_argument("--kill-offsets", type=_offsets, default=[30.0, 150.0],
                    help="added to the k-th kill time, cycled (30,150: with the defaults "
                         "the 1st kill is 30 s into a cut, the 2nd 90 s after one)")
    ap.add_argument("--warmup", type=float, default=120.0,
                    help="seconds before the RSS/fd start sample (120)")
    ap.add_argument("--sample-interval", type=float, default=10.0)
    ap.add_argument("--progress-interval", type=float, default=60.0)
    ap.add_argument("--stop-timeout", type=float, default=60.0,
                    help="devices' wait for their last PUBACKs after the load (60)")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="bound of the final drain (300)")
    ap.add_argument("--quiet", type=float, default=5.0,
                    help="drained = queue empty and nothing arrived for this long (5)")
    ap.add_argument("--durability", choices=("fsync", "normal"), default="fsync")
    ap.add_argument("--reconnect-max-s", type=float, default=None,
                    help="[[upstream]] reconnect_max_s (unset: the gateway default, 30)")
    ap.add_argument("--gateway-start-timeout", type=float, default=60.0)
    ap.add_argument("--dir", help="parent of the temporary directory (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-snapshot", action="store_true",
                    help="run the gateway from the tree instead of a copy taken at start")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the gateway")
    ap.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    ap.add_argument("--out", help="also write the JSON (with every sample) to this file")
    args = ap.parse_args(argv)
    if not 0 < args.devices <= MAX_DEVICES or args.rate <= 0 or args.minutes <= 0:
        ap.error("--devices must be 1..10000, --rate and --minutes > 0")
    if args.flap_period and args.flap_down >= args.flap_period:
        ap.error("--flap-down must be shorter than --flap-period")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one soak, print its JSON; exit status 0 = every check passed."""
    args = parse_args(argv)
    mt.raise_nofile(max(4096, args.devices * 4))
    tmp = Path(tempfile.mkdtemp(prefix="rapidmq-soak-", dir=args.dir))
    started = time.monotonic()
    result: dict[str, Any] = {
        "bench": "soak",
        "meta": {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "mosquitto": mt.mosquitto_version(args.mosquitto),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "tmp_dir": str(tmp),
        },
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("python", "mosquitto", "out", "dir", "keep")},
        "method": (
            "devices: firmware_sim fleet identities, topics and payloads (seeded), sent by "
            "the soak's own paced asyncio MQTT 3.1.1 QoS 1 clients (one connection per "
            "device, rate/devices msg/s each, reconnecting by themselves), not by the "
            "firmware_sim runner (fire-and-forget, no PUBACK tracking, no reconnect); "
            "upstream down = link cut in bench/fault_proxy.py between gateway and upstream "
            "Mosquitto (listener closed, connections reset), the upstream broker and the "
            "subscriber's persistent session stay up; kill = SIGKILL to the gateway's process "
            "group, restarted at once on the same data dir; RSS/fds from /proc/<pid>"
        ),
    }

    def _on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    soak = Soak(args, tmp)
    rc = 0
    raw: dict[str, Any] = {}
    try:
        raw = run(soak)
    except KeyboardInterrupt:
        result["meta"]["interrupted"] = True
        rc = 130
    except SoakError as exc:
        result["meta"]["error"] = str(exc)
        _log(f"error: {exc}")
        rc = 1
    finally:
        try:
            soak.cleanup()
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
    kinds = [e["event"] for e in soak.events]
    result["counts"] = {"kills": kinds.count("kill"), "flaps": kinds.count("flap_down"),
                        "unexpected_gateway_exits": kinds.count("gateway_exited"),
                        "incarnations": soak.incarnation}
    for k in ("code", "fleet", "drain", "gateway_cpu_s", "gateway_log"):
        if k in raw:
            result[k] = raw[k]
    if "reports" in raw:
        result["messages"] = messages_outcome(raw["reports"], raw["subscriber"])
        dev = [r["stats"] for r in raw["reports"]]
        result["devices"] = {k: sum(d[k] for d in dev) for k in dev[0]} if dev else {}
        secs = args.minutes * 60
        result["devices"]["achieved_msg_per_s"] = round(
            result["devices"].get("produced", 0) / secs, 1)
    result.update(resources(soak.samples, args.warmup, soak.events))
    if result.get("gateway_cpu_s") is not None and soak.samples:
        result["gateway_cpu_pct_mean"] = round(
            100 * result["gateway_cpu_s"] / max(1.0, soak.samples[-1]["t"]), 1)
    result["events"] = soak.events
    result["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    msgs = result.get("messages") or {}
    rss, fds = result["rss"], result["fds"]
    checks = {
        "acked_but_lost_is_0": msgs.get("acked_but_lost") == 0 if msgs else None,
        "rss_growth_below_5pct": (rss["growth_pct"] < 5.0
                                  if rss["growth_pct"] is not None else None),
        "fds_no_growth": (fds["end"] <= fds["start"]
                          if fds["start"] is not None and fds["end"] is not None else None),
        "drained": (result.get("drain") or {}).get("drained"),
    }
    result["checks"] = checks
    if rc == 0 and not all(checks.values()):
        rc = 2
    text = json.dumps(result, indent=2)
    print(text, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "samples": soak.samples}, indent=1) + "\n")
        _log(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
