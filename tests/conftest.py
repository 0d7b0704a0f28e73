"""Shared test fixtures.

Tests talk to real peers (mosquitto, paho-mqtt, ...) over loopback only. They use plain
threads, subprocesses or ``asyncio.run``; there is no asyncio pytest plugin.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from .gateway_proc import GatewayProcess

# --------------------------------------------------------------------------- helpers

LOOPBACK = "127.0.0.1"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"


_HANDED_OUT: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0).

    Never the same port twice in one test process: the kernel may offer a just-released
    port again, and a test that picks several ports before starting its servers would
    then give two of them the same one.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(host: str, port: int, timeout: float = 5.0) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _require_binary(path: str) -> None:
    """Skip when a system peer is missing locally; fail in CI, where `make test` installs it."""
    if shutil.which(path) is None:
        msg = f"{path} not installed (run `make system-deps`)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


# --------------------------------------------------------------------------- mosquitto


@dataclass
class MosquittoBroker:
    """A running reference mosquitto broker listening on ``host:port``."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    conf_path: Path
    log_path: Path
    log_file: IO[bytes] | None = field(repr=False, default=None)

    def log(self) -> str:
        """Everything mosquitto printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.log_file is not None:
            self.log_file.close()


def _start_mosquitto(tmp_dir: Path, extra_conf: str = "", attempts: int = 3) -> MosquittoBroker:
    """Start mosquitto on a free loopback port; retries if another process grabbed the port."""
    _require_binary(MOSQUITTO_BIN)
    last_log = ""
    for attempt in range(attempts):
        port = free_port()
        conf = tmp_dir / f"mosquitto-{port}.conf"
        log_path = tmp_dir / f"mosquitto-{port}.log"
        conf.write_text(
            f"listener {port} {LOOPBACK}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # as root mosquitto would drop to the "mosquitto" user, which cannot read or
            # write pytest's 0700 temp dirs (persistence files, ACLs, certificates)
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra_conf
        )
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed in MosquittoBroker.stop()
        proc = subprocess.Popen(
            [MOSQUITTO_BIN, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        broker = MosquittoBroker(LOOPBACK, port, proc, conf, log_path, log_file)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and proc.poll() is None:
            if wait_for_port(LOOPBACK, port, timeout=0.2):
                return broker
        broker.stop()
        last_log = broker.log()
        if attempt + 1 < attempts:
            time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"mosquitto did not start after {attempts} attempts:\n{last_log}")


def start_mosquitto_on(tmp: Path, port: int, extra_conf: str = "") -> MosquittoBroker:
    """Start mosquitto on a given port (the fixture always picks its own)."""
    conf = tmp / f"late-{port}.conf"
    log_path = tmp / f"late-{port}.log"
    conf.write_text(f"listener {port} {LOOPBACK}\nallow_anonymous true\npersistence false\n"
                    "log_dest stderr\n" + extra_conf)
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by MosquittoBroker.stop()
    proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=subprocess.STDOUT)
    broker = MosquittoBroker(LOOPBACK, port, proc, conf, log_path, log_file)
    if not wait_for_port(LOOPBACK, port, 5):
        broker.stop()
        raise RuntimeError(f"mosquitto did not start on {port}: {broker.log()}")
    return broker


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Start any number of mosquitto brokers: ``mosquitto_factory(extra_conf="...")``.

    Every broker started through the factory is stopped at teardown.
    """
    started: list[MosquittoBroker] = []

    def start(extra_conf: str = "") -> MosquittoBroker:
        broker = _start_mosquitto(tmp_path, extra_conf)
        started.append(broker)
        return broker

    yield start
    for broker in reversed(started):
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., MosquittoBroker]) -> MosquittoBroker:
    """A reference mosquitto on 127.0.0.1:<free port>, anonymous access allowed."""
    return mosquitto_factory()


# --------------------------------------------------------------------------- the gateway


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways: ``gateway_factory(config={...}, ws=False)``; all stopped at teardown."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | None = None, ws: bool = False) -> GatewayProcess:
        sub = tmp_path / f"gw{len(started)}"
        sub.mkdir()
        gw = GatewayProcess(sub, config, ws).start()
        started.append(gw)
        return gw

    yield start
    for gw in reversed(started):
        gw.stop()


@pytest.fixture
def gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """One gateway with default settings (anonymous allowed) on a free port."""
    return gateway_factory()
