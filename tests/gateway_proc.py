"""Run the real gateway (``python -m rapidmq_edge run``) as a subprocess for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import tomli_w

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    from .conftest import free_port  # one allocator: never the same port twice

    return free_port(LOOPBACK)


def _wait_port(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.03)
    return False


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class GatewayProcess:
    """A gateway subprocess with its own config, data dir and free ports.

    ``port`` is the plain TCP MQTT listener; ``ws_port`` a WebSocket one when ``ws=True``.
    ``config`` is merged over the defaults (anonymous allowed, $SYS every second).
    """

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None, ws: bool = False,
                 launcher: list[str] | None = None) -> None:
        self.tmp = tmp
        #: what runs ``rapidmq-edge``'s command line (``run --config ...`` follows)
        self.launcher = launcher or [sys.executable, "-m", "rapidmq_edge"]
        self.port = _free_port()
        self.ws_port = _free_port() if ws else None
        listen = [f"tcp://{LOOPBACK}:{self.port}"]
        if self.ws_port:
            listen.append(f"ws://{LOOPBACK}:{self.ws_port}/mqtt")
        base: dict[str, Any] = {
            "gateway": {"id": "test-gw", "data_dir": str(tmp / "data")},
            "mqtt": {"listen": listen, "sys_interval": 1.0},
            "auth": {"allow_anonymous": True},
        }
        self.config = _merge(base, config or {})
        self.config_path = tmp / f"gateway-{self.port}.toml"
        self.config_path.write_text(tomli_w.dumps(self.config))
        self.log_path = tmp / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return Path(self.config["gateway"]["data_dir"])

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        """Start and wait until every TCP listener accepts connections."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*self.launcher, "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        for port in (self.port, self.ws_port):
            if port and not _wait_port(port, timeout):
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log()}")
        return self

    def log(self) -> str:
        """Everything the gateway logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), killing after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, hard: bool = False) -> GatewayProcess:
        """Stop (or kill when ``hard``) and start again on the same ports and data."""
        (self.kill if hard else self.stop)()
        return self.start()
