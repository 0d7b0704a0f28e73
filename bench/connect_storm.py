"""A connect storm that is not the bottleneck: N MQTT 3.1.1 clients connect and subscribe.

Each worker process pre-builds every client's CONNECT + SUBSCRIBE bytes (one buffer per
client, sent in one ``send`` right after the TCP connect: MQTT lets a client send before its
CONNACK), then drives non-blocking sockets from one ``epoll`` in a tight loop, keeping at
most ``inflight`` handshakes open at a time (64: below Mosquitto's listen backlog of 100,
whose overflow costs a 1 s SYN retransmission; the gateway's is 1,024). A client
is done when its CONNACK (accepted) and SUBACK (granted) have arrived: the 9 bytes
``20 02 00 00 90 03 00 01 00``. The clock runs from the workers' common start to the last
client's SUBACK; the sockets stay open until every worker is done (then DISCONNECT).

``connect_storm(host, port, count)`` returns the time, each worker's CPU seconds and the
connects per CPU second of the generator; run it against Mosquitto too: when Mosquitto
finishes in a fraction of the gateway's time, the generator is not what is measured.

    python bench/connect_storm.py --port 1883 --clients 5000
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import multiprocessing as mp
import os
import resource
import select
import socket
import sys
import time
from typing import Any

try:  # ``python -m bench.connect_storm``
    from bench import loadgen
except ImportError:  # ``python bench/connect_storm.py`` (sys.path[0] == bench/)
    import loadgen  # type: ignore[no-redef]

EXPECTED = bytes.fromhex("200200009003000100")  # CONNACK accepted + SUBACK QoS 0 granted
KEEPALIVE = 600


def handshake_bytes(client_id: str, topic: str) -> bytes:
    """CONNECT (3.1.1, clean session) followed by SUBSCRIBE (packet id 1, QoS 0)."""
    return (loadgen.connect_packet(client_id, keepalive=KEEPALIVE)
            + loadgen.subscribe_packet(1, topic, 0))


def _storm(host: str, port: int, first: int, count: int, inflight: int, start_at: float,
           timeout: float, tag: str) -> tuple[list[socket.socket], float, float]:
    """Connect ``count`` clients; (sockets, time of the last SUBACK, CPU seconds)."""
    todo = [handshake_bytes(f"cs-{tag}-{i}", f"bench/storm/{i}")
            for i in range(first, first + count)]
    ep = select.epoll()
    socks: list[socket.socket] = []
    pending: dict[int, tuple[socket.socket, bytes, bytearray]] = {}
    addr = (host, port)
    nxt = 0
    while time.monotonic() < start_at:
        time.sleep(min(0.001, max(0.0, start_at - time.monotonic())))
    cpu0 = time.process_time()
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while nxt < count or pending:
        while nxt < count and len(pending) < inflight:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, f"connect: {os.strerror(err)}")
            fd = s.fileno()
            pending[fd] = (s, todo[nxt], bytearray())
            socks.append(s)
            ep.register(fd, select.EPOLLOUT)
            nxt += 1
        for fd, ev in ep.poll(1.0):
            s, out, got = pending[fd]
            if ev & select.EPOLLOUT:
                if s.send(out) != len(out):  # a few dozen bytes into an empty socket
                    raise OSError("short send")
                ep.modify(fd, select.EPOLLIN)
                continue
            data = s.recv(64)
            if not data:
                raise ConnectionError(f"closed by the broker after {bytes(got).hex()}")
            got += data
            if len(got) >= len(EXPECTED):
                if bytes(got) != EXPECTED:
                    raise ConnectionError(f"unexpected answer {bytes(got).hex()}")
                ep.unregister(fd)
                del pending[fd]
                last = time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(socks) - len(pending)}/{count} clients in {timeout} s")
    ep.close()
    return socks, last, time.process_time() - cpu0


def _worker(conn: Any, host: str, port: int, first: int, count: int, inflight: int,
            start_at: float, timeout: float, tag: str) -> None:
    socks: list[socket.socket] = []
    try:
        socks, last, cpu = _storm(host, port, first, count, inflight, start_at, timeout, tag)
        conn.send({"ok": True, "last": last, "cpu_s": cpu})
    except Exception as exc:
        conn.send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    conn.poll(timeout + 30)  # hold the connections until the parent has every result
    for s in socks:
        try:
            s.setblocking(True)
            s.send(b"\xe0\x00")
        except OSError:
            pass
        s.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (with its reaped children: none here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect_storm(host: str, port: int, count: int, procs: int = 2, inflight: int = 64,
                  timeout: float = 60.0, broker_pid: int | None = None) -> dict[str, Any]:
    """``count`` clients connect and subscribe from ``procs`` processes; the wall time from
    the common start to the last SUBACK, the generator's CPU time and, given ``broker_pid``,
    the broker's CPU time over the same span."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = count // procs + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    ctx = mp.get_context("fork")
    start_at = time.monotonic() + 0.3 + 0.05 * procs  # after every worker built its bytes
    per = [count // procs + (1 if i < count % procs else 0) for i in range(procs)]
    workers, pipes = [], []
    first = 0
    tag = f"{os.getpid()}-{int(time.time() * 1000) % 100000}"
    for i, n in enumerate(per):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, host, port, first, n,
                                              max(1, inflight // procs), start_at, timeout,
                                              f"{tag}-{i}"), daemon=True)
        p.start()
        child.close()
        workers.append(p)
        pipes.append(parent)
        first += n
    results = []
    broker_cpu = 0.0
    try:
        if broker_pid is not None:
            time.sleep(max(0.0, start_at - time.monotonic()))
            broker_cpu = -cpu_seconds(broker_pid)
        for pipe in pipes:
            if not pipe.poll(timeout + 5):
                results.append({"ok": False, "error": "worker did not answer"})
                continue
            results.append(pipe.recv())
        if broker_pid is not None:
            broker_cpu += cpu_seconds(broker_pid)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("close")
        for p in workers:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(2)
    errors = [r["error"] for r in results if not r.get("ok")]
    if errors:
        raise ConnectionError("; ".join(errors))
    wall = max(r["last"] for r in results) - start_at
    cpu = sum(r["cpu_s"] for r in results)
    out = {"clients": count, "procs": procs, "inflight": inflight, "connect_s": round(wall, 4),
           "generator_cpu_s": round(cpu, 4),
           "generator_connects_per_cpu_s": round(count / cpu) if cpu else None}
    if broker_pid is not None:
        out["broker_cpu_s"] = round(broker_cpu, 3)
        out["broker_us_per_connect"] = round(broker_cpu * 1e6 / count, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--broker-pid", type=int, help="report this process's CPU time too")
    args = ap.parse_args(argv)
    out = connect_storm(args.host, args.port, args.clients, args.procs, args.inflight,
                        broker_pid=args.broker_pid)
    print(json.dumps({**out, "loadavg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
