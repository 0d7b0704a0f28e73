"""CPU per packet of the MQTT reader: the C fast lane (``mqtt/_framing.c``) next to the
Python codec, in one invocation (``PacketReader(accelerated=False)`` is the reference).

    .venv/bin/python bench/mqtt_framing.py [--seconds 1.0] [--repeat 5]

Each case feeds 64 KiB reads of back-to-back packets (a publisher's or a subscriber's
steady state) to a reader and reports the process CPU time per packet (median of
``--repeat`` rounds, the two readers alternating), with the load average: the machine is
shared, CPU time is less sensitive to it than wall time but not immune.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rapidmq_edge.mqtt.codec import PacketReader, encode  # noqa: E402
from rapidmq_edge.mqtt.framing import SCAN  # noqa: E402
from rapidmq_edge.mqtt.packets import Packet, Puback, Publish  # noqa: E402

READ = 64 * 1024


def _cases() -> dict[str, tuple[int, bytes]]:
    def run(level: int, packet: Packet) -> tuple[int, bytes]:
        one = encode(packet, level)
        return level, one * max(1, READ // len(one))

    return {
        "publish_qos0_64B_v311": run(4, Publish("sensors/line-1/temp", b"x" * 64)),
        "publish_qos0_1KiB_v311": run(4, Publish("sensors/line-1/temp", b"x" * 1024)),
        "publish_qos1_64B_v311": run(4, Publish("sensors/line-1/temp", b"x" * 64, 1,
                                                 packet_id=42)),
        "publish_qos0_64B_v5": run(5, Publish("sensors/line-1/temp", b"x" * 64)),
        "puback_v311": run(4, Puback(42)),
    }


def _cpu_per_packet(level: int, data: bytes, accelerated: bool, seconds: float) -> float:
    reader = PacketReader(version=level, accelerated=accelerated)
    packets = 0
    t0 = time.process_time()
    deadline = t0 + seconds
    while True:
        packets += len(reader.feed(data))
        now = time.process_time()
        if now >= deadline:
            return (now - t0) / packets * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per round (1.0)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds per reader (5)")
    args = ap.parse_args(argv)
    out: dict[str, object] = {
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "c_lane_built": SCAN is not None,
        "unit": "process CPU us per packet, median of rounds",
        "cases": {},
    }
    cases: dict[str, object] = {}
    for name, (level, data) in _cases().items():
        runs: dict[str, list[float]] = {"python": [], "c_lane": []}
        for _ in range(args.repeat):
            runs["python"].append(_cpu_per_packet(level, data, False, args.seconds))
            if SCAN is not None:
                runs["c_lane"].append(_cpu_per_packet(level, data, True, args.seconds))
        py = statistics.median(runs["python"])
        c = statistics.median(runs["c_lane"]) if runs["c_lane"] else None
        cases[name] = {"python_us": round(py, 3), "c_lane_us": None if c is None else round(c, 3),
                       "speedup": None if not c else round(py / c, 2)}
    out["cases"] = cases
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
