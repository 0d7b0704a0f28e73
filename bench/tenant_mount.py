"""What the invisible tenant mountpoint costs: broker CPU per delivered message and per
CONNECT, clients without a tenant next to clients of one, in one invocation.

In-process: the real broker, gatekeeper (``tenant_source = "username_prefix"``) and
connection classes, fed the bytes of real MQTT 3.1.1 packets; the transports only count what
is written (no sockets: the numbers are the broker's own work, not the kernel's). Runs
alternate plain / tenant ``--repeat`` times; the median is kept. Prints JSON with the load
average (the machine is shared: CPU time, not wall time, is measured).

    .venv/bin/python bench/tenant_mount.py [--messages 200000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import encode_str, encode_varint, publish_packet, subscribe_packet  # noqa: E402
from rapidmq_edge.broker.broker import Broker, BrokerLimits  # noqa: E402
from rapidmq_edge.broker.connection import ClientConnection  # noqa: E402
from rapidmq_edge.broker.negotiation import ConnectionSettings  # noqa: E402
from rapidmq_edge.config import parse_config  # noqa: E402
from rapidmq_edge.security.gatekeeper import Gatekeeper  # noqa: E402

CHUNK = 500  # PUBLISH packets per data_received


class CountingTransport:
    """Counts written bytes; never pushes back."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None: ...
    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def connect_packet(client_id: str, username: str) -> bytes:
    body = encode_str("MQTT") + bytes([4, 0x82]) + (60).to_bytes(2, "big")
    body += encode_str(client_id) + encode_str(username)
    return b"\x10" + encode_varint(len(body)) + body


async def one_run(gk: Gatekeeper, prefix: str, messages: int, fanout: int) -> dict[str, float]:
    """``fanout`` subscribers and a publisher named ``prefix`` + ...; CPU per message."""
    broker = Broker(BrokerLimits(), read_check=gk.read_check)
    settings = ConnectionSettings()

    def conn(name: str) -> tuple[ClientConnection, CountingTransport]:
        t = CountingTransport()
        c = ClientConnection(broker, gk, settings, t, "127.0.0.1:1")
        c.data_received(connect_packet(name, prefix + name))
        return c, t

    t0 = time.process_time()
    subs = [conn(f"s{i}") for i in range(fanout)]
    pub, _ = conn("p")
    connect_us = (time.process_time() - t0) / (fanout + 1) * 1e6
    for c, _t in subs:
        c.data_received(subscribe_packet(1, "sensors/#", 0))
    await asyncio.sleep(0)
    # a tenant client names sensors/t (held as tenants/acme/sensors/t); a plain one the same
    chunk = publish_packet("sensors/t", b"x" * 64) * CHUNK
    before = [t.written for _c, t in subs]
    t0 = time.process_time()
    for _ in range(messages // CHUNK):
        pub.data_received(chunk)
        await asyncio.sleep(0)  # the connections' output is flushed
    cpu = time.process_time() - t0
    got = sum(t.written - b for (_c, t), b in zip(subs, before, strict=True))
    assert got >= messages * fanout * 66, f"deliveries missing ({got} bytes)"
    for c, _t in [*subs, (pub, None)]:
        c.close(send_will=False)
    return {"us_per_delivery": cpu / (messages * fanout) * 1e6, "us_per_connect": connect_us}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({"auth": {"tenant_source": "username_prefix"}}, Path(tmp))
        gk = Gatekeeper.from_config(config)
        out: dict[str, Any] = {"load_before": os.getloadavg()[0], "scenarios": {}}
        for fanout in (1, 10):
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "tenant": []}
            for _ in range(args.repeat):
                for kind, prefix in (("plain", "ops-"), ("tenant", "acme:")):
                    runs[kind].append(await one_run(gk, prefix, args.messages // fanout,
                                                    fanout))
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]}
                   for k, v in runs.items()}
            med["tenant_over_plain"] = {
                m: med["tenant"][m] / med["plain"][m] for m in med["plain"]}
            out["scenarios"][f"qos0_64B_fanout{fanout}"] = med
        out["load_after"] = os.getloadavg()[0]
        out["messages"] = args.messages
        out["repeat"] = args.repeat
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
