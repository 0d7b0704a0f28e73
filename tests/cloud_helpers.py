"""Helpers for the cloud-side tests: a real PostgreSQL server, a protected-stream publisher,
``cloud ingest`` consumer subprocesses."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rapidmq_edge.crypto.batch import BatchBuilder
from rapidmq_edge.crypto.batch_message import encode_batch_message
from rapidmq_edge.crypto.envelope import Sealer
from rapidmq_edge.crypto.keys import GatewayIdentity
from rapidmq_edge.crypto.keystore import KeyStore
from rapidmq_edge.crypto.signed_session import sign_session

from .conftest import LOOPBACK, free_port, wait_for_port

# --------------------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path | None:
    """Debian's newest ``/usr/lib/postgresql/<v>/bin`` (None if not installed)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[4]))
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "initdb").exists() else None


@dataclass
class PgServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<port> (trust auth, user postgres)."""

    base: Path
    port: int
    bin: Path
    as_postgres: bool
    made: list[str] = field(default_factory=list)

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_postgres else []
        subprocess.run([*prefix, *cmd], check=True, timeout=timeout, capture_output=True)

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{db}"

    def start(self) -> PgServer:
        data = self.base / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                  "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.base / "log"),
                  "-w", "-t", "30", "-o",
                  f"-p {self.port} -k {self.base} -c listen_addresses={LOOPBACK}", "start")
        assert wait_for_port(LOOPBACK, self.port, 10), (self.base / "log").read_text()
        return self

    def stop(self) -> None:
        with _suppress():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), "-m",
                      "immediate", "-w", "stop", timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)

    def create_db(self) -> str:
        """A fresh database; its DSN."""
        import asyncpg

        name = f"t{len(self.made)}_{os.getpid()}"
        self.made.append(name)

        async def make() -> None:
            conn = await asyncpg.connect(self.dsn())
            try:
                await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(make())
        return self.dsn(name)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server per test session (per xdist worker); stopped at the end."""
    binary = pg_bin()
    if binary is None:
        msg = "PostgreSQL not installed (run `make system-deps`)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="rmq-pg-"))
    if root:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
    server = PgServer(base, free_port(), binary, root)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> str:
    """A database of its own for each test."""
    return pg_server.create_db()


async def pg_rows(dsn: str, sql: str, *args: Any) -> list[Any]:
    """Run one query."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- a protected stream


@dataclass
class CloudKeys:
    cloud: Path
    trust: Path
    identity: GatewayIdentity
    recipient_public: Any


def cloud_keys(tmp: Path) -> CloudKeys:
    """A recipient key in ``tmp/cloud-keys``, a gateway identity trusted by it."""
    store = KeyStore(tmp / "cloud-keys")
    store.create_recipient()
    ident = GatewayIdentity.generate()
    trust = tmp / "identity.cose"
    trust.write_bytes(ident.cose_public_key())
    ring = store.recipient_keyring(None)
    return CloudKeys(store.directory, trust, ident, ring[next(iter(ring))].public())


class StreamMaker:
    """What a signing + encrypting gateway publishes: session header, sealed messages with
    ``rmq-id``, signed batches (leaves manifest)."""

    def __init__(self, keys: CloudKeys, gw: str, batch_size: int = 20) -> None:
        self.gw = gw
        self.sealer = Sealer(keys.recipient_public, gw)
        self.builder = BatchBuilder(keys.identity, gw)
        self.ident = keys.identity
        self.batch_size = batch_size
        self.next_q = 0
        self.qids: list[int] = []
        self.header_sent = False

    def session(self) -> tuple[str, bytes, str | None]:
        return (f"edge/{self.gw}/_session", sign_session(self.sealer.session_header, self.ident),
                None)

    def message(self, payload: bytes, sub: str = "s") -> tuple[str, bytes, str | None]:
        q = self.next_q
        self.next_q += 1
        topic, mid = f"edge/{self.gw}/{sub}/{q}", f"{self.gw}:{q}"
        env = self.sealer.seal(payload, topic=topic, message_id=mid).envelope
        self.builder.add(mid, topic, env)
        self.qids.append(q)
        return topic, env, mid

    def batch(self) -> tuple[str, bytes, str | None]:
        b = self.builder.seal()
        assert b is not None
        data = encode_batch_message(b, self.qids, True)
        self.qids = []
        return f"edge/{self.gw}/_batch", data, None


class Publisher:
    """One MQTT 5 QoS 1 publisher (paho) keeping ``rmq-id`` as a user property."""

    def __init__(self, port: int) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.acked = 0
        self._lock = threading.Lock()

        def on_publish(*_a: Any) -> None:
            with self._lock:
                self.acked += 1

        self.c.on_publish = on_publish
        self.c.connect(LOOPBACK, port)
        self.c.loop_start()
        self.sent = 0

    def send(self, items: list[tuple[str, bytes, str | None]]) -> None:
        for topic, payload, mid in items:
            props = Properties(PacketTypes.PUBLISH)
            if mid is not None:
                props.UserProperty = ("rmq-id", mid)
            self.c.publish(topic, payload, qos=1, properties=props)
            self.sent += 1

    def wait_acked(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < self.sent:
            assert time.monotonic() < deadline, f"{self.acked}/{self.sent} acknowledged"
            time.sleep(0.02)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --------------------------------------------------------------------------- consumers


class Consumer:
    """``rapidmq-edge cloud ingest`` as a subprocess (kill -9 / restart)."""

    def __init__(self, tmp: Path, port: int, keys: CloudKeys, out: str, name: str,
                 *extra: str) -> None:
        self.args = [sys.executable, "-m", "rapidmq_edge", "cloud", "ingest",
                     "--upstream", f"mqtt://{LOOPBACK}:{port}", "--keys-dir", str(keys.cloud),
                     "--trust", str(keys.trust), "--out", out, "--client-id", name,
                     "--chain-start", "0", "--grace", "1", "--lease", "3600", *extra]
        self.log = tmp / f"{name}.log"
        self.reports = tmp / f"{name}.reports.jsonl"
        self.args += ["--reports", str(self.reports)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self, wait: bool = True) -> Consumer:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while wait and b"cloud ingest: subscribed" not in self.log.read_bytes()[offset:]:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def report_kinds(self) -> list[str]:
        import json

        if not self.reports.exists():
            return []
        return [json.loads(line)["kind"] for line in self.reports.read_text().splitlines()]
