"""The cloud side into PostgreSQL (issue 16): consumer throughput with 1, 2 and 3 consumers,
end-to-end latency device -> row at a fixed rate, each next to a plain (no crypto) consumer
in the same run; ``--chaos`` the long chaos run.

Method. One Mosquitto 2, one PostgreSQL (a temp cluster), everything on loopback.

* Throughput: the k consumers of a ``$share`` group run; ``--messages`` sealed + signed
  messages (``--gateways`` synthetic gateways interleaved, leaves manifest, 64 per batch,
  sealed beforehand) are published at once by one paho client; rate = messages / (last
  row's ``received`` - first publish). CPU of each consumer from ``/proc/<pid>/stat`` over
  that time: CPU ms per message. The publisher and Mosquitto share the 2 cores.
  Efficiency(k) = rate(k) / (k x rate(1)). The plain reference: the same count of
  unprotected messages into the same table shape by a minimal consumer (this file,
  ``--plain-consumer``: same subscriber, chunked ``INSERT ... ON CONFLICT DO NOTHING`` then
  PUBACK), one process.
* Latency: a real gateway (encrypt + sign, ``batch_max_age`` 0.1 s) forwarding what a paho
  device publishes at ``--rate`` msg/s for ``--seconds``; each payload carries its send time;
  latency = the row's ``received`` (``clock_timestamp()`` at insert) - send time. Plain: the
  same gateway forwards ``plain/#`` unprotected to the plain consumer, in the same run.
* ``--chaos``: tests/cloud_chaos.py with ``--chaos-messages``, 3 consumers and 3 rounds of
  kills: partitions with the broker restarted by SIGTERM, a ``$share`` group with SIGTERM,
  partitions with the broker SIGKILLed.

Prints one JSON document; ``loadavg_before_after`` (2 shared cores: read ratios).

    python3 bench/cloud_ingest.py [--messages 6000] [--rate 1000] [--seconds 5] [--chaos]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


# --------------------------------------------------------------------------- plain consumer

async def plain_consumer(upstream: str, dsn: str, client_id: str, group: str) -> None:
    """Subscribe ``$share/<group>/plain/#`` and ``edge/+/plain/#``; rows without crypto."""
    import asyncpg

    from rapidmq_edge.cloud.pgstore import SCHEMA
    from rapidmq_edge.cloud.subscriber import Subscriber

    conn = await asyncpg.connect(dsn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7498353)")
        await conn.execute(SCHEMA)
    sub = Subscriber(upstream, client_id, [(f"$share/{group}/plain/#", 1),
                                           (f"$share/{group}/edge/+/plain/#", 1)], None,
                     session_expiry=3600)
    task = asyncio.ensure_future(sub.run())
    await sub.subscribed.wait()
    print("cloud ingest: subscribed", file=sys.stderr, flush=True)
    while True:
        items = await sub.take(512, 0.05)
        if not items:
            continue
        ids = [d.props.get("rmq-id") or f"{d.topic}:{hash(d.payload)}" for d in items]
        await conn.execute(
            "INSERT INTO messages (id, gateway, topic, payload, batch, encrypted, device_e2e, "
            "verdict, consumer) SELECT i, 'plain', t, p, 0, false, false, 'plain', $4 "
            "FROM unnest($1::text[], $2::text[], $3::bytea[]) AS x(i, t, p) "
            "ON CONFLICT DO NOTHING",
            ids, [d.topic for d in items], [d.payload for d in items], client_id)
        sub.ack(items)
    await task


# --------------------------------------------------------------------------- helpers

def _count(dsn: str, where: str = "") -> int:
    from tests.cloud_helpers import pg_rows

    return int(asyncio.run(pg_rows(dsn, f"SELECT COUNT(*) FROM messages {where}"))[0][0])


def _plain_proc(tmp: Path, port: int, dsn: str, name: str) -> subprocess.Popen[bytes]:
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen([sys.executable, __file__, "--plain-consumer",
                             f"mqtt://127.0.0.1:{port}", dsn, name],  # its own group
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while b"subscribed" not in (tmp / f"{name}.log").read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp / f"{name}.log").read_text()
        time.sleep(0.05)
    return proc


def _stop(procs: list[Any]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def throughput(tmp: Path, port: int, pg: Any, k: int, n: int, gateways: int,
               plain: bool = False) -> dict[str, Any]:
    """k consumers running; ``n`` published at once; time from the first publish to the
    last row, CPU of each consumer over that time."""
    from tests.cloud_helpers import Consumer, Publisher, StreamMaker, cloud_keys

    dsn = pg.create_db()
    run = tmp / f"{'plain' if plain else 'pq'}{k}"
    run.mkdir()
    keys = cloud_keys(run)
    names = [f"{run.name}c{i}" for i in range(k)]
    if plain:
        procs = [_plain_proc(run, port, dsn, names[0])]
    else:
        cons = [Consumer(run, port, keys, dsn, nm, "--group", run.name).start() for nm in names]
        procs = [c.proc for c in cons]
    items: list[tuple[str, bytes, str | None]] = []
    if plain:
        items = [(f"plain/d{i % 7}", f"x{i}".encode() + b"." * 40, f"plain:{i}")
                 for i in range(n)]
    else:
        makers = [StreamMaker(keys, f"gw{g}") for g in range(gateways)]
        per = n // gateways
        for i in range(per):  # the gateways interleaved, as a fleet's traffic is
            for mk in makers:
                if i == 0:
                    items.append(mk.session())
                items.append(mk.message(f"{mk.gw}-{i}".encode() + b"." * 40))
                if (i + 1) % 64 == 0 or i == per - 1:
                    items.append(mk.batch())
        n = per * gateways
    pub = Publisher(port)
    time.sleep(0.5)
    cpu0 = [cpu_seconds(p.pid) for p in procs]
    t0 = time.time()
    pub.send(items)
    pub.wait_acked(120)
    pub.close()
    deadline = time.monotonic() + 300
    while _count(dsn) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    cpu = [cpu_seconds(p.pid) - c0 for p, c0 in zip(procs, cpu0, strict=True)]
    _stop(procs)
    from tests.cloud_helpers import pg_rows

    done, last = asyncio.run(pg_rows(
        dsn, "SELECT COUNT(*), extract(epoch from max(received)) FROM messages"))[0]
    span = max(float(last or t0) - t0, 1e-3)
    return {"consumers": k, "messages": n, "rows": int(done), "seconds": round(span, 2),
            "msg_per_s": round(int(done) / span),
            "cpu_s_per_consumer": [round(c, 2) for c in cpu],
            "cpu_ms_per_msg": round(1000 * sum(cpu) / max(int(done), 1), 3)}


def latency(tmp: Path, port: int, pg: Any, rate: float, seconds: float) -> dict[str, Any]:
    """Device -> gateway -> broker -> consumer -> row, protected and plain in the same run."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.cloud_helpers import CloudKeys, Consumer, pg_rows
    from tests.crypto_e2e_helpers import gateway_config, make_keys
    from tests.gateway_proc import GatewayProcess

    dsn, plain_dsn = pg.create_db(), pg.create_db()
    run = tmp / "latency"
    run.mkdir()
    keys = make_keys(run)
    cfg = gateway_config(port, keys, batch_size=256, batch_max_age=0.1)
    gw_dir = run / "gw"
    gw_dir.mkdir()
    gw = GatewayProcess(gw_dir, cfg)
    ck = CloudKeys(keys.cloud, keys.trust, None, None)  # type: ignore[arg-type]
    cons = Consumer(run, port, ck, dsn, "lat-pq")
    procs: list[Any] = []
    try:
        cons.start()
        procs = [cons.proc, _plain_proc(run, port, plain_dsn, "lat-plain")]
        gw.start()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lat-dev",
                        protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", gw.port)
        c.loop_start()
        n = int(rate * seconds)
        t0 = time.monotonic()
        for i in range(n):
            now = time.time()
            c.publish(f"sensors/d{i % 7}", f"{now:.6f} {i}".encode(), qos=1)
            c.publish(f"plain/d{i % 7}", f"{now:.6f} {i}".encode(), qos=1)
            ahead = t0 + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        sent_s = time.monotonic() - t0
        deadline = time.monotonic() + 60
        sensors = "WHERE topic LIKE '%/sensors/%'"
        while (_count(dsn, sensors) < n or _count(plain_dsn) < n) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        c.disconnect()
        c.loop_stop()
        sql = "SELECT verdict, payload, extract(epoch from received) FROM messages "
        rows = asyncio.run(pg_rows(dsn, sql + sensors))
        rows += asyncio.run(pg_rows(plain_dsn, sql + "WHERE topic LIKE '%/plain/%'"))
    finally:
        gw.stop()
        cons.stop()
        _stop(procs)

    def stats(kind: str) -> dict[str, Any]:
        lat = sorted(1000 * (float(r[2]) - float(bytes(r[1]).split()[0])) for r in rows
                     if (r[0] == "plain") == (kind == "plain"))
        if not lat:
            return {"rows": 0}
        return {"rows": len(lat), "p50_ms": round(statistics.median(lat), 1),
                "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
                "max_ms": round(lat[-1], 1)}

    return {"rate": rate, "sent_per_kind": n, "send_seconds": round(sent_s, 2),
            "protected": stats("pq"), "plain": stats("plain")}


def chaos(tmp: Path, pg: Any, messages: int) -> list[dict[str, Any]]:
    """The long chaos run: partitions / $share, broker restarted by SIGTERM / SIGKILL."""
    from tests.cloud_chaos import run_chaos

    out = []
    for share, hard in ((False, False), (True, False), (False, True)):
        run = tmp / f"chaos-{'share' if share else 'part'}-{'kill' if hard else 'term'}"
        run.mkdir()
        res = run_chaos(run, pg.create_db(), messages=messages, rate=300.0, consumers=3,
                        rounds=3, broker_kill=hard, share=share, settle=40.0)
        out.append(dict(res.summary(), consumers="$share" if share else "partitions",
                        broker="SIGKILL" if hard else "SIGTERM",
                        reports=sorted({r[0] for r in res.bad_reports})))
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--plain-consumer":
        # a group of its own: Mosquitto keeps handing a $share group's messages to members
        # that went offline with a persistent session (queued for them)
        asyncio.run(plain_consumer(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=12000)
    ap.add_argument("--gateways", type=int, default=6)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--chaos", action="store_true")
    ap.add_argument("--chaos-messages", type=int, default=6000)
    args = ap.parse_args()

    import shutil

    from tests.cloud_helpers import PgServer, pg_bin
    from tests.conftest import _start_mosquitto, free_port

    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="rmq-cloud-bench-"))
    binary = pg_bin()
    assert binary is not None, "PostgreSQL not installed"
    pgbase = Path(tempfile.mkdtemp(prefix="rmq-pg-"))
    root = os.geteuid() == 0
    if root:
        shutil.chown(pgbase, "postgres", "postgres")
    pg = PgServer(pgbase, free_port(), binary, root)
    broker = None
    result: dict[str, Any] = {"bench": "cloud_ingest"}
    try:
        pg.start()
        broker = _start_mosquitto(tmp, "max_queued_messages 1000000\n"
                                       "max_inflight_messages 1000\n")
        if args.chaos:
            result["chaos"] = chaos(tmp, pg, args.chaos_messages)
        else:
            result["throughput"] = [throughput(tmp, broker.port, pg, k, args.messages,
                                               args.gateways) for k in (1, 2, 3)]
            result["throughput_plain"] = throughput(tmp, broker.port, pg, 1, args.messages,
                                                    args.gateways, plain=True)

            for key in ("throughput",):
                one = result[key][0]["msg_per_s"]
                result[f"{key}_scaling_efficiency"] = {
                    str(t["consumers"]): round(t["msg_per_s"] / (t["consumers"] * one), 2)
                    for t in result[key]}
            result["latency"] = latency(tmp, broker.port, pg, args.rate, args.seconds)
    finally:
        if broker is not None:
            broker.stop()
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["cores"] = os.cpu_count()
    result["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
