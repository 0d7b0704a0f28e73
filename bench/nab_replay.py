"""NAB through a running gateway: the ``--gateway`` half of ``bench/anomaly_nab.py``.

Every series of the shared NAB subset becomes an MQTT stream ``nab/<category>/<file>`` of
``{"value": x, "ts": <epoch s>}`` readings (the series' own timestamps: the gateway judges
them on the device's clock), all series interleaved in time order and published QoS 1 to a
gateway subprocess (``[intelligence]`` on, as shipped, threat watch off for the replaying
client) at a compressed pace. Each incident the gateway opens (``$edge/alerts/<kind>/<topic>``
with ``"state": "open"``) becomes a detection at the row whose timestamp is the alert's
``"at"``; every other row scores 0. The caller scores those rows with NAB's ``score.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rapidmq_edge.mqtt.codec import PacketReader, encode, encode_publish  # noqa: E402
from rapidmq_edge.mqtt.packets import (  # noqa: E402
    MQTT_311,
    PUBACK,
    PUBLISH,
    Connect,
    SubOptions,
    Subscribe,
)

Series = dict[str, tuple[list[str], list[float], list[float]]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _topic(name: str) -> str:
    cat, file = name.split("/", 1)
    return f"nab/{cat}/{file.removesuffix('.csv')}"


def replay(series: Series, rate: float = 5000.0, timeout: float = 600.0,
           extra_intelligence: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replay ``series`` through a fresh gateway; return ``{"scores": {name: [...]},
    "alerts": n, "published": n, "seconds": s, "gateway_cpu_s": s}``."""
    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="rapidmq-nab-"))
    intel = {"enabled": True, "threat": "off", "health": False, **(extra_intelligence or {})}
    lines = [f'[gateway]\nid = "nab"\ndata_dir = "{tmp / "data"}"\n',
             f'[mqtt]\nlisten = ["tcp://127.0.0.1:{port}"]\nsys_interval = 0\n',
             "[intelligence]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in intel.items())]
    conf = tmp / "gateway.toml"
    conf.write_text("".join(lines))
    log = open(tmp / "gateway.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "rapidmq_edge", "run", "--config", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        return _run(series, port, rate, timeout, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _run(series: Series, port: int, rate: float, timeout: float, pid: int) -> dict[str, Any]:
    return asyncio.run(_replay(series, port, rate, timeout, pid))


async def _connect(port: int, cid: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode(Connect(MQTT_311, cid, clean_start=True, keep_alive=600), MQTT_311))
    return reader, writer


async def _replay(series: Series, port: int, rate: float, timeout: float,
                  pid: int) -> dict[str, Any]:
    """The replaying device (QoS 1, a window of 100 unacknowledged) and the alert watcher,
    raw MQTT 3.1.1 on one event loop (a paho client tops out far below the pace)."""
    opened: list[dict[str, Any]] = []
    w_reader, w_writer = await _connect(port, "nab-alerts")
    w_writer.write(encode(Subscribe(1, [("$edge/alerts/#", SubOptions(0))]), MQTT_311))
    d_reader, d_writer = await _connect(port, "nab-replay")
    window = asyncio.Semaphore(100)
    acked = 0

    async def watch() -> None:
        pr = PacketReader(version=MQTT_311)
        while data := await w_reader.read(65536):
            for p in pr.feed(data):
                if p.type == PUBLISH:
                    body = json.loads(p.payload)  # type: ignore[attr-defined]
                    if body.get("state") == "open":
                        opened.append(body)

    async def acks() -> None:
        nonlocal acked
        pr = PacketReader(version=MQTT_311)
        while data := await d_reader.read(65536):
            for p in pr.feed(data):
                if p.type == PUBACK:
                    acked += 1
                    window.release()

    tasks = [asyncio.create_task(watch()), asyncio.create_task(acks())]
    await asyncio.sleep(0.5)
    events = sorted((t, name, i) for name, (_, ts, _) in series.items()
                    for i, t in enumerate(ts))
    topics = {name: _topic(name).encode() for name in series}
    cpu0 = _cpu_s(pid)
    t0 = time.monotonic()
    for k, (t, name, i) in enumerate(events):
        await window.acquire()
        payload = json.dumps({"value": series[name][2][i], "ts": t},
                             separators=(",", ":")).encode()
        d_writer.write(encode_publish(topics[name], payload, 1, False, False,
                                      k % 65535 + 1, None))
        ahead = t0 + (k + 1) / rate - time.monotonic()
        if ahead > 0.002:
            await asyncio.sleep(ahead)
        elif k % 200 == 0:
            await asyncio.sleep(0)
    deadline = time.monotonic() + timeout
    while acked < len(events) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    seconds = time.monotonic() - t0
    await asyncio.sleep(2.0)  # the last batches' alerts
    for task in tasks:
        task.cancel()
    for writer in (d_writer, w_writer):
        writer.close()
    by_topic = {_topic(name): name for name in series}
    scores = {name: [0.0] * len(ts) for name, (_, ts, _) in series.items()}
    index = {name: {t: i for i, t in reversed(list(enumerate(ts)))}
             for name, (_, ts, _) in series.items()}
    for body in opened:
        name = by_topic.get(body.get("stream", ""))
        if name is None:
            continue
        i = index[name].get(float(body["at"]))
        if i is not None:
            scores[name][i] = 1.0
    return {"scores": scores, "alerts": len(opened), "published": len(events),
            "acked": acked, "seconds": round(seconds, 1),
            "msg_per_s": round(len(events) / seconds, 1),
            "gateway_cpu_s": round(_cpu_s(pid) - cpu0, 1)}


def main(argv: list[str] | None = None) -> int:
    """Replay the shared NAB files through a gateway, score its incidents with NAB's
    ``score.py`` beside the same detector offline; print JSON."""
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import anomaly_nab as nab

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", type=Path, default=nab.DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "nab_replay")
    ap.add_argument("--rate", type=float, default=5000.0, help="messages per second")
    a = ap.parse_args(argv)
    series = nab.load_series(a.data)
    load0 = os.getloadavg()[0]
    run = replay(series, a.rate)
    nab.write_results(a.out, series, run.pop("scores"))
    offline = {n: nab.run_detector(ts, xs) for n, (_, ts, xs) in series.items()}
    nab.write_results(a.out.with_name(a.out.name + "_offline"), series, offline)
    doc = {"gateway": {**run, "nab": nab.score_results(a.data, a.out)},
           "offline": {"nab": nab.score_results(a.data, a.out.with_name(a.out.name + "_offline"))},
           "published": nab.PUBLISHED,
           "loadavg_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(doc, indent=1))
    return 0


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


if __name__ == "__main__":
    sys.exit(main())
