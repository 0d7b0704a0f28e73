"""The malformed corpus against the real gateway over TCP.

Every case gets its own connection (a valid CONNECT first unless the case is a bad
CONNECT) and must be answered by the server closing the connection within 2 s; a 5.0
client must first get a DISCONNECT with a reason code >= 0x80 (a CONNACK >= 0x80 for a
bad CONNECT), a 3.1.1 client nothing at all (or a refusing CONNACK for a bad CONNECT).
Meanwhile a well-behaved client stays connected and keeps being served.

The cases run concurrently once per module (so a server that hangs on many of them costs
2 s, not 2 s each); each case is then reported as its own test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rapidmq_edge.mqtt.codec import PacketReader, encode
from rapidmq_edge.mqtt.errors import MqttError
from rapidmq_edge.mqtt.packets import (
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Publish,
    Suback,
    SubOptions,
    Subscribe,
)

from .malformed_corpus import CORPUS, claimed_level, connect_bytes

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
CLOSE_WITHIN = 2.0
KEEP_ALIVE_SLACK = 1.5

CONF = """\
[gateway]
id = "test"
data_dir = "{data}"
[mqtt]
listen = ["tcp://127.0.0.1:{port}"]
topic_alias_maximum = 10
[auth]
allow_anonymous = true
"""

# --------------------------------------------------------------------------- the gateway


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("malformed-gw")
    port = _free_port()
    conf = tmp / "gateway.toml"
    conf.write_text(CONF.format(data=tmp / "data", port=port))
    log_path = tmp / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rapidmq_edge", "run", "--config", str(conf)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    gw = Gateway(port, proc, log_path)
    try:
        deadline = time.monotonic() + 10.0
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway did not start (exit {proc.poll()}):\n{gw.log_tail()}")
            time.sleep(0.05)
        yield gw
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# --------------------------------------------------------------------------- a tiny client


class Client:
    """A blocking raw-socket MQTT client that decodes what the server sends."""

    def __init__(self, port: int, version: int, client_id: str, keep_alive: int = 60) -> None:
        self.version = version
        self.sock = socket.create_connection((HOST, port), timeout=CLOSE_WITHIN)
        self.reader = PacketReader(version=version)
        self.pending: list[Packet] = []
        self.sock.sendall(encode(Connect(version, client_id, True, keep_alive), version))
        ack = self.next_packet()
        assert isinstance(ack, Connack) and ack.reason_code == 0, ack

    def send(self, p: Packet) -> None:
        self.sock.sendall(encode(p, self.version))

    def next_packet(self, timeout: float = CLOSE_WITHIN) -> Packet:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def expect(self, kind: type[Packet], timeout: float = CLOSE_WITHIN) -> Packet:
        p = self.next_packet(timeout)
        assert isinstance(p, kind), p
        return p

    def close(self) -> None:
        self.sock.close()


@dataclass
class Outcome:
    closed: bool = False
    reset: bool = False
    elapsed: float = 0.0
    received: bytes = b""
    error: str = ""
    packets: list[Packet] = field(default_factory=list)


def drain_until_closed(sock: socket.socket, timeout: float) -> Outcome:
    """Read until the server closes (b"" or a reset) or ``timeout`` passes."""
    out = Outcome()
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError):
            out.closed = out.reset = True
            break
        if not data:
            out.closed = True
            break
        out.received += data
    out.elapsed = time.monotonic() - start
    return out


def run_case(port: int, index: int, version: int, data: bytes) -> Outcome:
    try:
        with socket.create_connection((HOST, port), timeout=CLOSE_WITHIN) as sock:
            if version:
                sock.sendall(connect_bytes(version, f"malformed-{index}"))
                reader = PacketReader(version=version)
                got: list[Packet] = []
                while not got:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return Outcome(error="closed before CONNACK")
                    got = reader.feed(chunk)
                if not (isinstance(got[0], Connack) and got[0].reason_code == 0) or got[1:]:
                    return Outcome(error=f"bad CONNACK for the valid CONNECT: {got}")
            start = time.monotonic()
            with contextlib.suppress(OSError):  # the server closed while we still wrote
                sock.sendall(data)
            out = drain_until_closed(sock, CLOSE_WITHIN - (time.monotonic() - start))
            out.elapsed = time.monotonic() - start
            return out
    except OSError as exc:
        return Outcome(error=f"{type(exc).__name__}: {exc}")


def problems(version: int, data: bytes, out: Outcome) -> list[str]:
    """What the server did wrong with this case (empty when it behaved)."""
    if out.error:
        return [out.error]
    found = []
    if not out.closed:
        found.append(f"connection still open after {CLOSE_WITHIN} s")
    level = version or claimed_level(data)
    try:
        packets = PacketReader(version=level or 4).feed(out.received)
    except MqttError as exc:
        return [*found, f"sent undecodable bytes {out.received!r}: {exc}"]
    out.packets = packets
    if version == 4:
        if packets:
            found.append(f"3.1.1 client got {packets} before the close (expected nothing)")
    elif version == 5:
        if not packets:
            found.append("no DISCONNECT before the close")
        bad = [p for p in packets if not (isinstance(p, Disconnect) and p.reason_code >= 0x80)]
        if bad:
            found.append(f"got {bad} (only a DISCONNECT >= 0x80 is allowed)")
    else:
        refusing = [
            p for p in packets
            if isinstance(p, Connack) and not p.session_present
            and (p.reason_code >= 0x80 if level == 5 else 1 <= p.reason_code <= 5)
        ]
        if len(refusing) != len(packets) or len(packets) > 1:
            found.append(f"got {packets} (only one refusing CONNACK is allowed)")
        if level == 5 and not packets:
            found.append("no CONNACK >= 0x80 for a bad 5.0 CONNECT")
    return found


@dataclass
class Barrage:
    outcomes: dict[str, Outcome]
    bystander: Client


@pytest.fixture(scope="module")
def barrage(gateway: Gateway) -> Iterator[Barrage]:
    """A well-behaved subscriber connects, then every corpus case runs concurrently."""
    bystander = Client(gateway.port, 5, "bystander")
    bystander.send(Subscribe(1, [("bystander/#", SubOptions(1))]))
    bystander.expect(Suback)
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = {
            name: pool.submit(run_case, gateway.port, i, version, data)
            for i, (name, version, data, _) in enumerate(CORPUS)
        }
        outcomes = {name: f.result() for name, f in futures.items()}
    try:
        yield Barrage(outcomes, bystander)
    finally:
        bystander.close()


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    ("name", "version", "data", "needs_server"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_server_closes_on_malformed(
    barrage: Barrage, gateway: Gateway, name: str, version: int, data: bytes,
    needs_server: bool,
) -> None:
    out = barrage.outcomes[name]
    found = problems(version, data, out)
    assert not found, (
        f"{name}: sent {data!r}; " + "; ".join(found)
        + f" (received {out.received!r}, after {out.elapsed:.2f} s)"
    )


def test_server_still_serves_everyone(barrage: Barrage, gateway: Gateway) -> None:
    assert gateway.proc.poll() is None, f"gateway died:\n{gateway.log_tail()}"
    for version in (4, 5):
        c = Client(gateway.port, version, f"after-barrage-{version}")
        try:
            c.send(Subscribe(1, [(f"roundtrip/{version}", SubOptions(1))]))
            c.expect(Suback)
            c.send(Publish(f"roundtrip/{version}", b"hello", 1, packet_id=2))
            c.send(Publish("bystander/news", b"still here", 1, packet_id=3))
            got = [c.next_packet(), c.next_packet(), c.next_packet()]
            pubs = [p for p in got if isinstance(p, Publish)]
            acks = sorted(p.packet_id for p in got if isinstance(p, Puback))
            assert acks == [2, 3], got
            assert [(p.topic, p.payload) for p in pubs] == [(f"roundtrip/{version}", b"hello")]
        finally:
            c.close()
        p = barrage.bystander.expect(Publish)
        assert isinstance(p, Publish)
        assert (p.topic, p.payload) == ("bystander/news", b"still here")
        barrage.bystander.send(Puback(p.packet_id))


@pytest.mark.parametrize("version", [4, 5])
def test_half_a_packet_then_silence_hits_keep_alive(gateway: Gateway, version: int) -> None:
    c = Client(gateway.port, version, f"half-packet-{version}", keep_alive=1)
    try:
        c.sock.sendall(b"\x30\x10\x00\x03ab")  # a PUBLISH that never completes
        out = drain_until_closed(c.sock, 1.5 + KEEP_ALIVE_SLACK)
    finally:
        c.close()
    assert out.closed, f"still open {out.elapsed:.2f} s after half a packet (keep alive 1 s)"
    assert out.elapsed >= 1.0, f"closed after {out.elapsed:.2f} s, before the keep-alive expired"
    packets = PacketReader(version=version).feed(out.received)
    if version == 5:
        codes = [p.reason_code if isinstance(p, Disconnect) else p for p in packets]
        assert codes == [0x8D], f"expected a DISCONNECT 0x8D (keep alive timeout), got {packets}"
    else:
        assert packets == []
