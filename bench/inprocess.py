"""The in-process gateway of the benchmarks that drive it without sockets.

Imported by the child processes of ``bench/connect_inprocess.py`` and
``bench/publish_opcodes.py`` after they put the source tree being measured first on
``sys.path``: a ``Gateway`` built (not started) from a minimal MQTT-only config, and clients
attached to it through the real ``MqttStreamProtocol`` on a stub transport.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidmq_edge.config.document import load_config
from rapidmq_edge.gateway.assembly import Gateway
from rapidmq_edge.ingress.mqtt_server import MqttStreamProtocol


class StubTransport:
    """What a connection writes: its size (``n``), the bytes when ``keep``, and a call of
    ``on_write`` (if set) after each write."""

    __slots__ = ("n", "out", "keep", "on_write")

    def __init__(self, keep: bool = False) -> None:
        self.n = 0
        self.out: list[bytes] = []
        self.keep = keep
        self.on_write: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        self.n += len(data)
        if self.keep:
            self.out.append(bytes(data))
        if self.on_write is not None:
            self.on_write()

    def close(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def build_gateway(extra: str = "", max_connections: int = 1000) -> Gateway:
    """A gateway from a minimal MQTT-only config in a fresh temporary directory (``extra``:
    more TOML, e.g. ACL rules), its broker started, no listener."""
    d = Path(tempfile.mkdtemp(prefix="rapidmq-inproc-"))
    (d / "g.toml").write_text(
        f'[gateway]\nid = "b"\ndata_dir = "{d / "data"}"\n[mqtt]\n'
        f'listen = ["tcp://127.0.0.1:1"]\nmax_connections = {max_connections}\n'
        'max_queued_messages = 100000\n[auth]\nallow_anonymous = true\n' + extra)
    gw = Gateway(load_config(d / "g.toml"))
    gw.broker.start()
    return gw


def attach(gw: Gateway, transport: StubTransport) -> MqttStreamProtocol:
    """A client connection of ``gw`` on ``transport`` (nothing received yet)."""
    p = MqttStreamProtocol(gw._connection, gw.registry, "tcp://127.0.0.1:1")
    p.connection_made(transport)
    return p
