"""Where a latency tail comes from: the gateway's own time per message vs the machine's.

Runs ``bench/mqtt_throughput.py``'s latency scenario (QoS 0 and 1 at ``--rate`` msg/s, a
paced publisher and a subscriber in their own processes) against a gateway that records,
in its own process:

* ``inside``: per delivery, the time from the PUBLISH reaching
  ``ClientConnection.data_received`` to the delivery's hand-over to the socket (``_flush``,
  or ``_write`` itself for a read holding one packet):
  the gateway's processing, its output batching and deferred flush included;
* ``loop_callback``: a thread asks the event loop every millisecond to run a callback
  (``call_soon_threadsafe``): how late it runs (the loop busy with something else: $SYS,
  status file, timers, GC, or the process waiting for a CPU);
* ``thread_wakeup``: how late that thread's own 1 ms sleeps wake (the OS alone);
* ``gc``: the collector's pauses once the gateway runs (after its start's ``gc.freeze``);
* ``arrival``: from the publisher's send (the ``time.monotonic_ns()`` at the start of its
  payload) to ``data_received``: the kernel and the gateway's wake-up;
* ``written``: from the publisher's send to the return of the delivery's
  ``transport.write`` (uvloop sends at once when the socket's buffer is empty); the rest
  of the end-to-end time is the subscriber's side.

Wrapping two methods for timestamps is the only change to the gateway; a tail seen end to
end but not ``inside`` is not the gateway's code. Usage::

    python bench/gateway_inside.py [--seconds 5] [--rate 1000]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import runpy
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _q(values: list[float]) -> dict[str, Any]:
    s = sorted(values)
    if not s:
        return {"n": 0}
    at = lambda p: round(s[min(len(s) - 1, int(len(s) * p))] * 1e3, 3)  # noqa: E731
    return {"n": len(s), "p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999),
            "max_ms": at(1.0)}


def serve(argv: list[str], report: Path) -> None:
    """Run ``rapidmq-edge run ARGV`` in this process with the recorders; write ``report``
    at exit."""
    sys.path.insert(0, str(REPO))
    from rapidmq_edge.broker.broker import Broker
    from rapidmq_edge.broker.connection import ClientConnection
    from rapidmq_edge.gateway import process

    pc = time.perf_counter
    last_in = [0.0]
    inside: list[float] = []
    loop_late: list[float] = []
    wake_late: list[float] = []
    gc_pauses: list[float] = []
    arrival: list[float] = []
    written: list[float] = []
    last_in_ns = [0]
    stamp = [0]  # the publisher's send time of the last message routed
    data_received, flush = ClientConnection.data_received, ClientConnection._flush
    conn_write = ClientConnection._write
    from rapidmq_edge.broker.connection import WRITE_NOW
    publish = Broker.publish

    def timed_data_received(self: Any, data: bytes) -> None:
        last_in[0] = pc()
        last_in_ns[0] = time.monotonic_ns()
        data_received(self, data)

    def timed_publish(self: Any, msg: Any) -> int:
        if len(msg.payload) >= 8:
            stamp[0] = int.from_bytes(msg.payload[:8], "big")
            arrival.append((last_in_ns[0] - stamp[0]) / 1e9)
        return publish(self, msg)

    def timed_flush(self: Any) -> None:
        delivery = bool(self._out and last_in[0])
        if delivery:
            inside.append(pc() - last_in[0])
        flush(self)
        if delivery and self.client_id.startswith("lg-sub") and stamp[0]:
            written.append((time.monotonic_ns() - stamp[0]) / 1e9)

    def timed_write(self: Any, data: bytes) -> None:
        # a lone packet's write goes to the socket from _write itself, without _flush
        direct = (self.broker.flush_queue is WRITE_NOW and not self._out
                  and self._connack is None and last_in[0] and not self.closed
                  and self.client_id.startswith("lg-sub"))  # a delivery, not an ack
        if direct:
            inside.append(pc() - last_in[0])
        conn_write(self, data)
        if direct and stamp[0]:
            written.append((time.monotonic_ns() - stamp[0]) / 1e9)

    ClientConnection.data_received = timed_data_received  # type: ignore[method-assign]
    ClientConnection._flush = timed_flush  # type: ignore[method-assign]
    ClientConnection._write = timed_write  # type: ignore[method-assign]
    Broker.publish = timed_publish  # type: ignore[method-assign]
    gc_start = [0.0]

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = pc()
        elif gc.get_freeze_count():  # running: not the collection before gc.freeze()
            gc_pauses.append(pc() - gc_start[0])

    gc.callbacks.append(on_gc)

    def probe(loop: Any) -> None:
        while True:
            t = pc()
            time.sleep(0.001)
            woke = pc()
            wake_late.append(woke - t - 0.001)
            try:
                loop.call_soon_threadsafe(lambda w=woke: loop_late.append(pc() - w))
            except RuntimeError:  # the loop is closed
                return

    original = process.serve

    async def serve_with_probe(config: Any, ready: Any = None) -> None:
        import asyncio

        threading.Thread(target=probe, args=(asyncio.get_running_loop(),), daemon=True).start()
        await original(config, ready)

    process.serve = serve_with_probe  # type: ignore[assignment]

    def write() -> None:
        report.write_text(json.dumps({
            "inside": _q(inside), "arrival": _q(arrival), "written": _q(written),
            "loop_callback": _q(loop_late[1000:]),
            "thread_wakeup": _q(wake_late[1000:]),
            "gc": {"pauses": len(gc_pauses), "total_ms": round(sum(gc_pauses) * 1e3, 2),
                   "max_ms": round(max(gc_pauses, default=0.0) * 1e3, 2)},
        }))

    atexit.register(write)
    sys.argv = ["rapidmq-edge", "run", *argv]
    runpy.run_module("rapidmq_edge", run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--serve"]:  # the gateway side (started by the bench below)
        serve(args[2:], Path(args[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=1000.0)
    opts_in = ap.parse_args(args)
    sys.path.insert(0, str(REPO / "bench"))
    import mqtt_throughput as mt

    tmp = Path(tempfile.mkdtemp(prefix="gateway-inside-"))
    out: dict[str, Any] = {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}

    class InsideBroker(mt.Broker):
        def _command(self) -> list[str]:  # [python, -m, rapidmq_edge, run, --config, F]
            cmd = super()._command()
            return [self.python, __file__, "--serve", str(self.workdir / "inside.json"),
                    *cmd[4:]]

    opts = mt.Options(messages=0, qos1_messages=0, fanout_messages=0, window=50,
                      latency_rate=opts_in.rate, latency_seconds=opts_in.seconds,
                      idle_clients=0, scenario_timeout=90.0, pin=False, settle=1.0, repeat=1,
                      nap=0.0)
    for qos in (0, 1):
        broker = InsideBroker(name=f"inside-qos{qos}", kind="rapidmq",
                              workdir=tmp / f"qos{qos}", mosquitto_bin="", python=sys.executable,
                              start_timeout=20.0)
        if not broker.start():
            print(f"gateway did not start: {broker.error}", file=sys.stderr)
            return 1
        try:
            e2e = mt.run_latency(broker, opts, qos=qos)
        finally:
            broker.stop()
        report = broker.workdir / "inside.json"
        inside = json.loads(report.read_text()) if report.exists() else {}
        out[f"qos{qos}"] = {"end_to_end": {k: e2e.get(k) for k in (
            "p50", "p99", "max", "sched_p99_ms", "received", "expected")}, **inside}
    out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
