"""CoAP ingest benchmark: confirmable publishes/s through the gateway into the durable store.

Processes (all on 127.0.0.1, free ports, stopped at the end):

* the gateway (``python -m rapidmq_edge run``) with ``[coap] listen`` and one
  ``[[upstream]]`` that is down (a closed port) plus ``[[forward]] filter = "bench/#"``:
  every publication is committed to the store-and-forward queue (``[queue] durability``
  = ``--durability``, default ``fsync``) before its 2.xx is sent. Measured twice:
  ``fast_path`` (plain publications, the gateway's own UDP fast path) and ``aiocoap_path``
  (the same requests plus a Size1 option, which the fast path leaves to aiocoap's
  resources: what every publication cost before the fast path);
* ``reference``: a trivial aiocoap server in its own process (same interpreter, uvloop,
  ``udp6`` transport) whose resource answers every POST/PUT with 2.04 at once: the ceiling
  of aiocoap's message layer on this machine, no broker, no store;
* load: ``--procs`` generator processes, each with ``--clients`` UDP sockets (= CoAP
  endpoints, own source port) keeping ``--window`` CON requests in flight each: raw
  pre-encoded CoAP (``POST /ps/data/bench/<client>`` 64-byte JSON, Content-Format 50, or
  ``PUT`` with ``--method put``), distinct message ids and tokens, retransmitting after
  2 s like RFC 7252 (counted).

``req_per_s`` = 2.xx responses received / (last response - first request), over all
generators; ``errors`` = other responses; ``retransmits``; ``server_cpu_pct``.
Afterwards the gateway's status file must show every acknowledged publication in the
forwarding queue (``every_acknowledged_publication_stored``): a 2.xx means committed.
``loadavg_before_after``: the machine is shared, read ratios rather than absolute rates.

Usage::

    .venv/bin/python bench/coap_ingest.py               # ~30 s
    .venv/bin/python bench/coap_ingest.py --quick       # ~10 s
    .venv/bin/python bench/coap_ingest.py --out bench/results/coap_ingest.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TARGET_REQ_S = 5000.0
RETRANSMIT_S = 2.0
IDLE_S = 15.0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- raw CoAP load


def _request_template(code: int, path: list[str], payload: bytes,
                      size1: bool = False) -> tuple[bytes, bytes]:
    """(header-less options+payload, token length) of a CON request: Uri-Path x N,
    Content-Format 50 (and Size1, which sends the request down the gateway's aiocoap path)."""
    out = bytearray()
    last = 0
    opts = [(11, s.encode()) for s in path] + [(12, b"\x32")]
    if size1:
        opts.append((60, bytes([len(payload)])))
    for number, value in opts:
        delta = number - last
        last = number
        ln = len(value)
        d = delta if delta < 13 else 13
        lb = ln if ln < 13 else 13
        out += bytes([(d << 4) | lb])
        if d == 13:
            out += bytes([delta - 13])
        if lb == 13:
            out += bytes([ln - 13])
        out += value
    out += b"\xff" + payload
    return bytes(out), bytes([code])


def generator(port: int, clients: int, window: int, total: int, code: int, seed: int,
              conn: Any, size1: bool = False) -> None:
    """One load process: ``clients`` sockets, ``window`` CON requests in flight each,
    ``total`` requests overall; sends its counters through ``conn``."""
    sel = selectors.DefaultSelector()
    socks = []
    addr = (HOST, port)
    bodies = []
    for c in range(clients):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.connect(addr)
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, c)
        payload = json.dumps({"gen": seed, "client": c, "v": 21.5, "pad": "x" * 16}).encode()
        payload = payload[:64].ljust(64, b" ")
        rest, _ = _request_template(code, ["ps", "data", "bench", f"g{seed}c{c}"], payload,
                                    size1)
        bodies.append(rest)
    hdr = struct.Struct("!BBHI")  # ver/type/tkl, code, mid, 4-byte token
    # in flight per client: token -> (sent at, datagram, still to be retransmitted)
    inflight: list[dict[int, list[Any]]] = [{} for _ in range(clients)]
    mids = [((seed * 7919 + c * 104729) & 0xFFFF) for c in range(clients)]
    tokens = [(seed << 24) | (c << 12) for c in range(clients)]
    sent = ok = errors = retransmits = separate = 0
    error_codes: dict[str, int] = {}
    first = last = 0.0
    conn.send("ready")
    conn.recv()  # go
    first = time.monotonic()

    def send_new(c: int) -> None:
        nonlocal sent
        mids[c] = (mids[c] + 1) & 0xFFFF
        tokens[c] = (tokens[c] + 1) & 0xFFFFFFFF
        data = hdr.pack(0x44, code, mids[c], tokens[c]) + bodies[c]
        inflight[c][tokens[c]] = [time.monotonic(), data, True]
        socks[c].send(data)
        sent += 1

    for c in range(clients):
        for _ in range(window):
            if sent < total:
                send_new(c)
    deadline = time.monotonic() + 600
    last = time.monotonic()
    next_check = time.monotonic() + 0.5
    while (ok + errors) < total and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            c = key.data
            s = socks[c]
            while True:
                try:
                    data = s.recv(2048)
                except OSError:
                    break
                if len(data) < 4:
                    continue
                mtype = (data[0] >> 4) & 3
                if mtype == 0:  # a separate (CON) response: acknowledge it
                    s.send(bytes([0x60, 0]) + data[2:4])
                if data[1] == 0:  # empty ACK: the response comes separately
                    for entry in inflight[c].values():
                        if entry[1][2:4] == data[2:4]:
                            entry[2] = False  # acknowledged: no more retransmissions
                            separate += 1
                            break
                    continue
                if len(data) < 8 or data[0] & 15 != 4:
                    continue
                tok = int.from_bytes(data[4:8], "big")
                if inflight[c].pop(tok, None) is None:
                    continue  # duplicate
                if data[1] >> 5 == 2:
                    ok += 1
                else:
                    errors += 1
                    name = f"{data[1] >> 5}.{data[1] & 31:02d}"
                    error_codes[name] = error_codes.get(name, 0) + 1
                last = time.monotonic()
                if sent < total:
                    send_new(c)
        now = time.monotonic()
        if now - last > IDLE_S:
            break  # nothing answered for a while: give up, report what is unanswered
        if now >= next_check:
            next_check = now + 0.5
            for c in range(clients):
                for entry in inflight[c].values():
                    if entry[2] and now - entry[0] > RETRANSMIT_S:
                        entry[0] = now
                        socks[c].send(entry[1])
                        retransmits += 1
    conn.send({"sent": sent, "ok": ok, "errors": errors, "retransmits": retransmits,
               "separate_responses": separate,
               "first": first, "last": last, "error_codes": error_codes,
               "unanswered": sum(len(f) for f in inflight)})
    for s in socks:
        s.close()


def run_load(port: int, args: argparse.Namespace, pid: int | None,
             size1: bool = False) -> dict[str, Any]:
    code = 3 if args.method == "put" else 2
    per = args.messages // args.procs
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    for i in range(args.procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=generator,
                        args=(port, args.clients, args.window, per, code, i, child, size1))
        p.start()
        procs.append(p)
        pipes.append(parent)
    for pipe in pipes:
        if not pipe.poll(20):
            raise RuntimeError("generator did not start")
        pipe.recv()
    cpu0 = _cpu(pid)
    t0 = time.monotonic()
    for pipe in pipes:
        pipe.send("go")
    results = []
    for pipe in pipes:
        if not pipe.poll(args.timeout):
            results.append({"error": "timeout"})
            continue
        results.append(pipe.recv())
    wall = time.monotonic() - t0
    cpu1 = _cpu(pid)
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    good = [r for r in results if "error" not in r]
    ok = sum(r["ok"] for r in good)
    first = min((r["first"] for r in good), default=0.0)
    last = max((r["last"] for r in good), default=0.0)
    span = last - first if last > first else wall
    out: dict[str, Any] = {
        "requests": args.messages, "ok": ok,
        "errors": sum(r["errors"] for r in good),
        "error_codes": _merge_counts([r["error_codes"] for r in good]),
        "retransmits": sum(r["retransmits"] for r in good),
        "separate_responses": sum(r["separate_responses"] for r in good),
        "unanswered": sum(r["unanswered"] for r in good),
        "seconds": round(span, 3), "req_per_s": round(ok / span, 1) if span else None,
        "generator_timeouts": len(results) - len(good),
    }
    if cpu0 is not None and cpu1 is not None:
        out["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / wall, 1)
    return out


def _merge_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------- servers

REFERENCE = r"""
import asyncio, sys
import aiocoap, aiocoap.resource as r
class Sink(r.Resource):
    async def render_post(self, request):
        return aiocoap.Message(code=aiocoap.CHANGED)
    render_put = render_post
class Tree(r.Site, r.PathCapable):
    pass
async def main():
    site = r.Site()
    sink = Sink()
    class Any_(r.Resource, r.PathCapable):
        async def render_post(self, request):
            return aiocoap.Message(code=aiocoap.CHANGED)
        render_put = render_post
    site.add_resource(["ps", "data"], Any_())
    await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", int(sys.argv[1])), transports=["udp6"])
    print("ready", flush=True)
    await asyncio.Event().wait()
try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def wait_coap(port: int, timeout: float) -> bool:
    probe = struct.pack("!BBH", 0x40, 1, 1) + bytes([0xBB]) + b".well-known" + bytes([4]) \
        + b"core"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            s.sendto(probe, (HOST, port))
            try:
                s.recv(2048)
                return True
            except OSError:
                time.sleep(0.05)
    return False


def gateway_toml(data_dir: Path, mqtt_port: int, coap_port: int, down_port: int,
                 args: argparse.Namespace) -> str:
    return (
        "[gateway]\n"
        'id = "bench-gw"\n'
        f'data_dir = "{data_dir}"\n'
        'log_level = "warning"\n'
        "[mqtt]\n"
        f'listen = ["tcp://{HOST}:{mqtt_port}"]\n'
        "sys_interval = 1.0\n"
        "[auth]\n"
        "allow_anonymous = true\n"
        "[coap]\n"
        f'listen = ["udp://{HOST}:{coap_port}"]\n'
        "[[upstream]]\n"
        'name = "cloud"\n'
        f'urls = ["mqtt://{HOST}:{down_port}"]\n'
        "[[forward]]\n"
        'filter = "bench/#"\n'
        'upstream = "cloud"\n'
        "qos = 1\n"
        "[queue]\n"
        f'durability = "{args.durability}"\n'
        f"commit_delay_ms = {args.commit_delay_ms}\n"
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def status(data_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((data_dir / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def run_gateway(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data_dir = tmp / "gw-data"
    coap_port, mqtt_port, down = free_udp_port(), free_tcp_port(), free_tcp_port()
    conf = tmp / "gateway.toml"
    conf.write_text(gateway_toml(data_dir, mqtt_port, coap_port, down, args))
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([args.python, "-m", "rapidmq_edge", "run", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        if not wait_coap(coap_port, 20):
            return {"error": "gateway did not start: "
                    + (tmp / "gateway.log").read_text(errors="replace")[-500:]}
        warm = argparse.Namespace(**{**vars(args), "messages": min(2000, args.messages)})
        acked = run_load(coap_port, warm, None)["ok"]
        res = run_load(coap_port, args, proc.pid)
        acked += res["ok"]
        out: dict[str, Any] = {"fast_path": res}
        if args.slow_messages:
            # the same publications with a Size1 option: served by aiocoap's resources
            slow = argparse.Namespace(**{**vars(args), "messages": args.slow_messages})
            out["aiocoap_path"] = run_load(coap_port, slow, proc.pid, size1=True)
            acked += out["aiocoap_path"]["ok"]
        time.sleep(2.5)  # the status file is refreshed every second
        fwd = status(data_dir).get("forwarding") or {}
        out["acknowledged"] = acked
        out["stored"] = fwd.get("queued")
        out["every_acknowledged_publication_stored"] = fwd.get("queued") == acked
        out["store_commits"] = fwd.get("commits")
        out["durability"] = args.durability
        return out
    finally:
        stop(proc)
        log.close()


def run_reference(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_udp_port()
    script = tmp / "reference_server.py"
    script.write_text(REFERENCE)
    proc = subprocess.Popen([args.python, str(script), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        if not wait_coap(port, 20):
            return {"error": "reference server did not start"}
        ref = argparse.Namespace(**{**vars(args), "messages": args.ref_messages})
        warm = argparse.Namespace(**{**vars(args), "messages": min(2000, args.messages)})
        run_load(port, warm, None)
        return run_load(port, ref, proc.pid)
    finally:
        stop(proc)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (~10 s)")
    ap.add_argument("--messages", type=int, help="requests per run (60000; quick 10000)")
    ap.add_argument("--ref-messages", type=int,
                    help="requests for the aiocoap reference (20000; quick 5000)")
    ap.add_argument("--slow-messages", type=int,
                    help="requests down the gateway's aiocoap path (10000; quick 3000; 0: skip)")
    ap.add_argument("--procs", type=int, default=2, help="generator processes (2)")
    ap.add_argument("--clients", type=int, default=50, help="CoAP endpoints per process (50)")
    ap.add_argument("--window", type=int, default=2,
                    help="CON requests in flight per endpoint (2; RFC 7252 NSTART is 1)")
    ap.add_argument("--method", choices=("post", "put"), default="post")
    ap.add_argument("--durability", choices=("fsync", "normal"), default="fsync")
    ap.add_argument("--commit-delay-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--dir", help="parent of the data directory (default: system temp)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    args.messages = args.messages or (10_000 if args.quick else 60_000)
    if args.ref_messages is None:
        args.ref_messages = 5_000 if args.quick else 20_000
    if args.slow_messages is None:
        args.slow_messages = 3_000 if args.quick else 10_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="coap-bench-", dir=args.dir))
    load_before = os.getloadavg()
    try:
        gw = run_gateway(args, tmp)
        ref = {} if args.skip_reference else run_reference(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {
        "benchmark": "coap_ingest",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "params": {k: v for k, v in vars(args).items() if k not in ("python", "out", "dir")},
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "gateway": gw,
        "reference_aiocoap": ref,
    }
    fast = (gw.get("fast_path") or {}).get("req_per_s")
    slow = (gw.get("aiocoap_path") or {}).get("req_per_s")
    result["target"] = {"req_per_s_ge": TARGET_REQ_S, "met": bool(fast and fast >= TARGET_REQ_S)
                        and bool(gw.get("every_acknowledged_publication_stored"))}
    if fast and ref.get("req_per_s"):
        result["gateway_vs_reference"] = round(fast / ref["req_per_s"], 3)
    if fast and slow:
        result["fast_path_vs_aiocoap_path"] = round(fast / slow, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
