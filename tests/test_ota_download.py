"""OTA downloads (rapidmq_edge/ota/download.py, the HTTP half of ota/fetch.py): the plan and
chunk checks, the partial file with its fsynced bitmap (resume, refusal, corruption found at
finish, garbage), the byte-rate cap, and the HTTP Range fetcher against a real aiohttp
server (resume, 206 required, retries, the cap)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiohttp import web

from rapidmq_edge.ota.download import (
    ChunkPlan,
    DownloadError,
    PartialDownload,
    check_plan,
    discard_superseded,
    plan_chunks,
)
from rapidmq_edge.ota.fetch import HttpRangeFetcher, RateCap, download

from .conftest import LOOPBACK, free_port

CHUNK = 16 * 1024


def payload_of(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    block = seed.to_bytes(4, "big")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


# =========================================================================== plan and chunks


def test_plan_cuts_payload_and_bad_plans_name_their_fault() -> None:
    data = payload_of(100_000)
    plan = plan_chunks(data, CHUNK)
    assert plan.payload_size == 100_000 and len(plan.chunk_digests) == 7  # 6 full + 1 short
    assert plan.payload_digest == hashlib.sha256(data).digest()
    assert plan.chunk_digests[6] == hashlib.sha256(data[6 * CHUNK:]).digest()
    check_plan(plan)
    for bad, reason in [
        (replace(plan, chunk_digests=plan.chunk_digests[:-1]), "6 chunk digests for 7"),
        (replace(plan, payload_size=0), "not positive"),
        (replace(plan, chunk_size=0), "chunk size 0"),
        (replace(plan, payload_digest=b"x" * 31), "not 32 bytes"),
        (replace(plan, chunk_digests=(*plan.chunk_digests[:-1], b"y")), "chunk digest is not"),
    ]:
        with pytest.raises(DownloadError, match=reason):
            check_plan(bad)


def test_put_verifies_every_chunk_and_refuses_counted(tmp_path: Path) -> None:
    data = payload_of(50_000)
    plan = plan_chunks(data, CHUNK)
    with PartialDownload(tmp_path, plan) as part:
        assert part.missing() == [0, 1, 2, 3]
        assert (tmp_path / f"{plan.payload_digest.hex()}.part").stat().st_size == 50_000
        assert not part.put(0, data[CHUNK:2 * CHUNK])  # another chunk's bytes
        assert "SHA-256 does not match" in (part.last_refusal or "")
        assert not part.put(3, data[3 * CHUNK:] + b"!")  # longer than signed
        assert "bytes, the plan says" in (part.last_refusal or "")
        assert not part.put(9, b"x")
        assert "outside" in (part.last_refusal or "")
        assert part.missing() == [0, 1, 2, 3] and part.refused == 3
        assert part.put(1, data[CHUNK:2 * CHUNK])
        assert part.put(1, data[CHUNK:2 * CHUNK])  # again: held, counted as wasted
        p = part.progress
        assert part.missing() == [0, 2, 3]
        assert p.done_bytes == CHUNK and p.chunks_done == 1 and p.refused == 3
        assert p.wasted == CHUNK + CHUNK + (50_000 - 3 * CHUNK + 1) + 1
        assert p.received == p.wasted + CHUNK
        assert p.fraction == pytest.approx(CHUNK / 50_000)
        with pytest.raises(DownloadError, match="3 of 4 chunks still missing"):
            part.finish()


def test_resumes_from_the_bitmap_and_finishes_atomically(tmp_path: Path) -> None:
    data = payload_of(70_000)
    plan = plan_chunks(data, CHUNK)
    part = PartialDownload(tmp_path / "partial", plan)
    for i in (0, 2, 4):
        assert part.put(i, data[i * CHUNK:(i + 1) * CHUNK])
    part.close()  # as after a restart: only the files remain
    again = PartialDownload(tmp_path / "partial", plan)
    assert again.missing() == [1, 3]
    assert again.progress.received == 2 * CHUNK + 70_000 - 4 * CHUNK
    for i in again.missing():
        assert again.put(i, data[i * CHUNK:(i + 1) * CHUNK])
    final = again.finish(tmp_path / "model.onnx")
    assert final.read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "partial").iterdir()) == []  # no leftovers


def test_sidecar_of_another_plan_starts_over(tmp_path: Path) -> None:
    data = payload_of(40_000)
    plan = plan_chunks(data, CHUNK)
    with PartialDownload(tmp_path, plan) as part:
        assert part.put(0, data[:CHUNK])
    other = plan_chunks(data, 8 * 1024)  # same payload, other chunking: other bitmap
    with PartialDownload(tmp_path, other) as part:
        assert part.missing() == list(range(5)) and part.progress.received == 0
    with PartialDownload(tmp_path, plan) as part:
        assert part.missing() == [0, 1, 2]  # the sidecar went with the other plan


def test_finish_finds_a_chunk_changed_on_disk_and_fetches_it_again(tmp_path: Path) -> None:
    data = payload_of(48_000)
    plan = plan_chunks(data, CHUNK)
    part = PartialDownload(tmp_path, plan)
    for i in range(3):
        assert part.put(i, data[i * CHUNK:(i + 1) * CHUNK])
    with open(part.part_path, "r+b") as fh:  # bit rot after the bit was set
        fh.seek(CHUNK + 5)
        fh.write(b"\xff")
    with pytest.raises(DownloadError, match="1 chunk"):
        part.finish()
    assert part.missing() == [1]
    part.close()
    with PartialDownload(tmp_path, plan) as part:  # the re-queue is persisted too
        assert part.missing() == [1]
        assert part.put(1, data[CHUNK:2 * CHUNK])
        assert part.finish().read_bytes() == data


def test_finish_refuses_a_plan_whose_whole_digest_is_wrong(tmp_path: Path) -> None:
    data = payload_of(20_000)
    plan = replace(plan_chunks(data, CHUNK), payload_digest=hashlib.sha256(b"other").digest())
    with PartialDownload(tmp_path, plan) as part:
        for i in range(2):
            assert part.put(i, data[i * CHUNK:(i + 1) * CHUNK])
        with pytest.raises(DownloadError, match="does not match the plan"):
            part.finish()
        assert part.part_path.exists()  # nothing moved into place


def test_superseded_partials_are_deleted(tmp_path: Path) -> None:
    old, new = plan_chunks(payload_of(30_000, 1), CHUNK), plan_chunks(payload_of(30_000, 2), CHUNK)
    for plan in (old, new):
        with PartialDownload(tmp_path, plan) as part:
            assert part.put(0, payload_of(30_000, 1 if plan is old else 2)[:CHUNK])
    (tmp_path / "unrelated.txt").write_text("kept")
    gone = discard_superseded(tmp_path, [new.payload_digest])
    assert sorted(p.name for p in gone) == sorted(
        [f"{old.payload_digest.hex()}.part", f"{old.payload_digest.hex()}.bits"])
    with PartialDownload(tmp_path, new) as part:
        assert part.missing() == [1]
    assert (tmp_path / "unrelated.txt").exists()


def test_rate_cap_books_bytes_at_the_rate() -> None:
    now = [100.0]
    cap = RateCap(1000.0, burst=100.0, clock=lambda: now[0])
    assert cap.reserve(500) == 0.0  # the first booking runs into debt, at once
    assert cap.reserve(500) == pytest.approx(0.4)  # 500 bytes of debt minus 100 of burst
    now[0] += 5.0  # idle: only the burst is credited, not 5 s worth
    assert cap.reserve(300) == 0.0
    assert cap.reserve(10) == pytest.approx(0.2)
    assert RateCap(0).reserve(1 << 30) == 0.0  # unlimited


# =========================================================================== HTTP Range


@dataclass
class RangeServer:
    """A real aiohttp server for one payload; counts bytes served, injects faults."""

    payload: bytes
    served: int = 0
    requests: int = 0
    fail_next: int = 0  # answer 503 to this many requests
    ignore_range: bool = False  # answer 200 with the whole payload
    url: str = ""
    runner: web.AppRunner | None = field(default=None, repr=False)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="busy")
        if self.ignore_range:
            self.served += len(self.payload)
            return web.Response(body=self.payload)
        rng = request.http_range
        start, stop = rng.start or 0, min(rng.stop or len(self.payload), len(self.payload))
        body = self.payload[start:stop]
        self.served += len(body)
        return web.Response(status=206, body=body, headers={
            "Content-Range": f"bytes {start}-{stop - 1}/{len(self.payload)}"})

    async def start(self, file_path: Path | None = None) -> RangeServer:
        app = web.Application()
        app.router.add_get("/model.onnx", self.handle)
        if file_path is not None:  # aiohttp's own Range implementation
            async def static(_request: web.Request) -> web.StreamResponse:
                return web.FileResponse(file_path)

            app.router.add_get("/static.onnx", static)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, LOOPBACK, port).start()
        self.url = f"http://{LOOPBACK}:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def test_http_range_download_from_a_stock_file_server(tmp_path: Path) -> None:
    data = payload_of(200_000)
    (tmp_path / "srv.bin").write_bytes(data)
    plan = plan_chunks(data, CHUNK)
    states: list[tuple[str, str]] = []
    fractions: list[float] = []

    async def main() -> Path:
        server = await RangeServer(data).start(tmp_path / "srv.bin")
        try:
            fetcher = HttpRangeFetcher(server.url + "/static.onnx", window=3)
            return await asyncio.wait_for(download(
                plan, fetcher, tmp_path / "partial", dest=tmp_path / "model.onnx",
                on_progress=lambda p: fractions.append(p.fraction),
                on_state=lambda s, r: states.append((s, r))), 20)
        finally:
            await server.stop()

    path = asyncio.run(main())
    assert hashlib.sha256(path.read_bytes()).digest() == plan.payload_digest
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert states[-1][0] == "downloaded" and not [s for s in states if s[0] == "retrying"]


def test_http_resumes_after_a_stop_and_fetches_only_what_is_missing(tmp_path: Path) -> None:
    data = payload_of(300_000)
    plan = plan_chunks(data, CHUNK)

    async def main() -> tuple[int, int, Path]:
        server = await RangeServer(data).start()
        try:
            half = asyncio.Event()
            fetcher = HttpRangeFetcher(server.url + "/model.onnx", window=2, bandwidth=300_000)
            task = asyncio.create_task(download(
                plan, fetcher, tmp_path, on_progress=lambda p: (
                    half.set() if p.fraction >= 0.5 else None)))
            await asyncio.wait_for(half.wait(), 10)
            task.cancel()  # the process goes away mid-download
            with pytest.raises(asyncio.CancelledError):
                await task
            first = server.served
            with PartialDownload(tmp_path, plan) as part:
                left = sum(min(CHUNK, plan.payload_size - i * CHUNK) for i in part.missing())
            assert 0 < left <= plan.payload_size // 2
            path = await asyncio.wait_for(download(
                plan, HttpRangeFetcher(server.url + "/model.onnx", window=2), tmp_path), 10)
            return first, server.served - first, path
        finally:
            await server.stop()

    first, second, path = asyncio.run(main())
    assert path.read_bytes() == data
    assert first + second <= 1.10 * len(data), (first, second)
    assert second < len(data) * 0.6  # the restart did not start over


def test_http_requires_206_and_retries_until_the_server_behaves(tmp_path: Path) -> None:
    data = payload_of(60_000)
    plan = plan_chunks(data, CHUNK)
    states: list[tuple[str, str]] = []

    async def main() -> Path:
        server = await RangeServer(data, fail_next=2, ignore_range=False).start()
        server.ignore_range = True
        server.fail_next = 0
        try:
            fetcher = HttpRangeFetcher(server.url + "/model.onnx", window=1, retry_max=0.3)
            task = asyncio.create_task(download(
                plan, fetcher, tmp_path, on_state=lambda s, r: states.append((s, r))))
            deadline = time.monotonic() + 10
            while not any("206 required" in r for _, r in states):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            server.ignore_range = False
            server.fail_next = 2  # then a busy spell
            return await asyncio.wait_for(task, 15)
        finally:
            await server.stop()

    path = asyncio.run(main())
    assert path.read_bytes() == data
    reasons = [r for s, r in states if s == "retrying"]
    assert any("HTTP 200" in r and "206 required" in r for r in reasons)
    assert any("HTTP 503" in r for r in reasons)
    assert states[-1][0] == "downloaded"


def test_http_bandwidth_cap_holds(tmp_path: Path) -> None:
    data = payload_of(400_000)
    plan = plan_chunks(data, CHUNK)

    async def main() -> float:
        server = await RangeServer(data).start()
        try:
            t0 = time.monotonic()
            await asyncio.wait_for(download(plan, HttpRangeFetcher(
                server.url + "/model.onnx", window=4, bandwidth=200_000), tmp_path), 15)
            return time.monotonic() - t0
        finally:
            await server.stop()

    took = asyncio.run(main())
    rate = len(data) / took
    assert took >= 1.6, f"400 KB at a 200 KB/s cap took {took:.2f} s"  # within -20 %
    assert rate >= 200_000 * 0.6, f"{rate:.0f} B/s: the cap slowed far below itself"


def test_http_fetcher_refuses_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported payload URL"):
        HttpRangeFetcher("ftp://x/y")


@dataclass(frozen=True)
class ManifestLike:
    """Any object with the plan's four attributes will do (ota.manifest.Manifest is one)."""

    component: str
    payload_digest: bytes
    payload_size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]


def test_any_object_with_the_plan_attributes_is_a_plan(tmp_path: Path) -> None:
    data = payload_of(20_000)
    p: ChunkPlan = plan_chunks(data, CHUNK)
    m = ManifestLike("anomaly", p.payload_digest, p.payload_size, p.chunk_size, p.chunk_digests)
    with PartialDownload(tmp_path, m) as part:
        assert part.put(0, data[:CHUNK]) and part.put(1, data[CHUNK:])
        assert part.finish().read_bytes() == data


def test_the_signed_manifest_is_a_plan(tmp_path: Path) -> None:
    from rapidmq_edge.ota.manifest import Manifest, Vectors

    data = payload_of(40_000, seed=4)
    p = plan_chunks(data, CHUNK)
    m = Manifest("anomaly", 3, "3", p.payload_digest, p.payload_size, p.chunk_size,
                 p.chunk_digests, "edge-x86", "0", (), (), Vectors((), ()))
    with PartialDownload(tmp_path, m) as part:
        for i in part.missing():
            assert part.put(i, data[i * CHUNK:(i + 1) * CHUNK])
        assert part.finish().read_bytes() == data
