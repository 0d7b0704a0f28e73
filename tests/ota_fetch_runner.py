"""One MQTT download in a process of its own (tests/test_ota_transport.py kills it with -9).

``python -m tests.ota_fetch_runner URL PLAN_JSON DIR --bandwidth B --gateway-id G``; prints
one JSON line per stored chunk (``{"done": n, "received": bytes}``) and
``{"finished": path}`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from rapidmq_edge.ota.download import ChunkPlan, Progress
from rapidmq_edge.ota.fetch import MqttChunkFetcher, download
from rapidmq_edge.ota.link import OtaLink
from rapidmq_edge.uplink.backoff import Backoff


def load_plan(path: Path) -> ChunkPlan:
    d = json.loads(path.read_text())
    return ChunkPlan(bytes.fromhex(d["payload_digest"]), d["size"], d["chunk_size"],
                     tuple(bytes.fromhex(h) for h in d["chunk_digests"]))


def dump_plan(plan: ChunkPlan, path: Path) -> None:
    path.write_text(json.dumps({
        "payload_digest": plan.payload_digest.hex(), "size": plan.payload_size,
        "chunk_size": plan.chunk_size, "chunk_digests": [h.hex() for h in plan.chunk_digests]}))


async def run(args: argparse.Namespace) -> None:
    link = OtaLink([args.url], args.gateway_id, backoff=Backoff(0.05, 0.5))
    task = asyncio.create_task(link.run())
    fetcher = MqttChunkFetcher(link, window=args.window, bandwidth=args.bandwidth)

    def progress(p: Progress) -> None:
        print(json.dumps({"done": p.chunks_done, "received": p.received}), flush=True)

    path = await download(load_plan(Path(args.plan)), fetcher, Path(args.dir),
                          on_progress=progress)
    print(json.dumps({"finished": str(path)}), flush=True)
    await link.stop()
    await task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("plan")
    ap.add_argument("dir")
    ap.add_argument("--bandwidth", type=float, default=0.0)
    ap.add_argument("--window", type=int, default=2)
    ap.add_argument("--gateway-id", default="gw-runner")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
