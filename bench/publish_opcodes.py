"""Python opcodes per PUBLISH in the gateway, without sockets: a deterministic cost measure.

Timings of a paced message move with the machine (docs/benchmarks.md: the p99 at 1,000
msg/s, ±10-20 % between invocations); the number of Python bytecode instructions the
gateway runs per message does not. For each source tree (``--tree ROLE=PATH``, the working
tree as ``after``) a subprocess builds a ``Gateway`` from a minimal MQTT-only config (not
started), connects a subscriber (QoS 0 or 1 subscription) and a publisher through the real
``MqttStreamProtocol`` on a stub transport, warms up with 500 messages and counts
``sys.settrace`` opcode events over 2,000 more (64 B payloads, one topic):

* ``lone_to_write``: one PUBLISH per read, counted until the delivery's ``write`` (what a
  paced subscriber waits for);
* ``lone_total``: the same, everything (the subscriber's PUBACK included at QoS 1);
* ``batched``: reads of ``--batch`` PUBLISHes, the subscriber acknowledging after each.

``--acl N`` adds N ACL rules (``bench/mqtt_throughput.py``'s). Usage::

    python bench/publish_opcodes.py --tree before=/tmp/before [--acl 10] [--batch 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, gc, json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import uvloop
from inprocess import StubTransport, attach, build_gateway
from mqtt_throughput import gateway_acl

QOS, ACL, BATCH = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
TOPIC, PAYLOAD, WARM, COUNT = "bench/ops", b"x" * 64, 500, 2000


def packet(first, body):
    return bytes((first, len(body))) + body


def connect(cid):
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid.encode()
    return packet(0x10, body)


def publish(i):
    pid = (i % 60000 + 1).to_bytes(2, "big") if QOS else b""
    return packet(0x30 | QOS << 1, len(TOPIC).to_bytes(2, "big") + TOPIC.encode() + pid + PAYLOAD)


def pubacks(out):
    # the subscriber's PUBACK for every PUBLISH in ``out`` (bytes the gateway wrote to it)
    data, acks, i = b"".join(out), bytearray(), 0
    out.clear()
    while i < len(data):
        j, n, mul = i + 1, 0, 1
        while True:
            b = data[j]; n += (b & 127) * mul; mul *= 128; j += 1
            if not b & 128: break
        if data[i] >> 4 == 3 and data[i] & 6:
            tl = int.from_bytes(data[j:j + 2], "big")
            acks += b"\x40\x02" + data[j + 2 + tl:j + 4 + tl]
        i = j + n
    return bytes(acks)


async def main():
    gw = build_gateway(gateway_acl(ACL))
    def client(cid):
        t = StubTransport(keep=True)
        p = attach(gw, t)
        p.data_received(connect(cid))
        return p, t
    sub, st = client("sub")
    sub.data_received(packet(0x82, b"\x00\x01" + len(TOPIC).to_bytes(2, "big") + TOPIC.encode()
                             + bytes((QOS,))))
    await asyncio.sleep(0.05)
    pub, _ = client("pub")
    await asyncio.sleep(0.05)
    st.out.clear()
    frames = [publish(i) for i in range(WARM + COUNT)]
    counting = [True]
    ops = [0]
    def tracer(frame, event, arg):
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode" and counting[0]:
            ops[0] += 1
        return tracer
    def send(fs, traced):
        data = b"".join(fs)
        sys.settrace(traced)  # only the gateway's frames are traced, not this harness
        pub.data_received(data)
        sys.settrace(None)
        if QOS:
            acks = pubacks(st.out)
            sys.settrace(traced)
            sub.data_received(acks)
            sys.settrace(None)
        else:
            st.out.clear()
    def run(batch, to_write):
        ops[0] = 0
        def stop(): counting[0] = False
        st.on_write = stop if to_write else None
        for f in frames[:WARM]:
            send([f], None)
        gc.collect(); gc.freeze()
        for i in range(WARM, WARM + COUNT, batch):
            counting[0] = True
            send(frames[i:i + batch], tracer)
        st.on_write = None
        return round(ops[0] / COUNT, 1)
    out = {"lone_to_write": run(1, True), "lone_total": run(1, False),
           f"batched_{BATCH}": run(BATCH, False)}
    print(json.dumps(out))

uvloop.run(main())
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", default=[], metavar="ROLE=PATH",
                    help="another source tree to measure beside this one (repeatable)")
    ap.add_argument("--acl", type=int, default=0, help="ACL rules configured (default 0)")
    ap.add_argument("--batch", type=int, default=20, help="PUBLISHes per read when batched")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    trees["after"] = str(REPO)
    out: dict[str, dict[str, object]] = {}
    for role, tree in trees.items():
        for qos in (0, 1):
            res = subprocess.run(
                [sys.executable, "-c", CHILD, tree, str(REPO / "bench"), str(qos),
                 str(args.acl), str(args.batch)],
                capture_output=True, text=True, timeout=300, check=False)
            if res.returncode:
                out.setdefault(role, {})[f"qos{qos}"] = {"error": res.stderr.strip()[-800:]}
                continue
            out.setdefault(role, {})[f"qos{qos}"] = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps({"acl_rules": args.acl, "opcodes_per_message": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
