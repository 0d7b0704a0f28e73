"""The OTA transport over a real Mosquitto (rapidmq_edge/ota/link.py, fetch.py, publish.py):
publish (chunks, then the manifest last) and download over MQTT 5 and 3.1.1; a wrong
retained chunk refused and fetched again once corrected; kill -9 of a downloading process
and its resume (bytes on the wire counted by a relay: <= 1.10 x the payload) with the will
reporting it offline; the broker stopped mid-download; the bandwidth cap; connection
errors logged once with a count."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import queue
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rapidmq_edge.config.forwarding import UpstreamSettings
from rapidmq_edge.ota.download import ChunkPlan, PartialDownload, plan_chunks
from rapidmq_edge.ota.fetch import MqttChunkFetcher, chunk_topic, download
from rapidmq_edge.ota.link import OtaLink, state_topic
from rapidmq_edge.ota.publish import manifest_topic, publish_files, publish_update
from rapidmq_edge.uplink.backoff import Backoff

from .conftest import (
    LOOPBACK,
    MOSQUITTO_BIN,
    MosquittoBroker,
    _require_binary,
    free_port,
    start_mosquitto_on,
    wait_for_port,
)
from .ota_fetch_runner import dump_plan
from .test_uplink import _make_ca_and_server_cert

PREFIX = "rapidmq/ota"
ROOT = Path(__file__).resolve().parent.parent
FAST = Backoff(initial=0.05, maximum=0.5)


def payload_of(n: int, seed: int = 7) -> bytes:
    out = bytearray()
    block = seed.to_bytes(4, "big")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def url(port: int) -> str:
    return f"mqtt://{LOOPBACK}:{port}"


def start_broker(tmp: Path, port: int | None = None) -> MosquittoBroker:
    """Mosquitto with persistence (retained messages survive a restart on the same port)."""
    _require_binary(MOSQUITTO_BIN)
    port = port or free_port()
    store = tmp / f"store-{port}"
    store.mkdir(exist_ok=True)
    return start_mosquitto_on(tmp, port, f"persistence true\npersistence_location {store}/\n"
                              "autosave_interval 0\n"
                              + ("user root\n" if os.geteuid() == 0 else ""))


@pytest.fixture
def brokers(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[MosquittoBroker] = []

    def start(port: int | None = None) -> MosquittoBroker:
        b = start_broker(tmp_path, port)
        started.append(b)
        return b

    yield start
    for b in reversed(started):
        b.stop()


class CountingRelay:
    """A TCP relay to the broker that counts the bytes the broker sends to the client."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.down = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await r.read(65536):
                    if count:
                        self.down += len(data)
                    w.write(data)
                    await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection(LOOPBACK, self.target)
            await asyncio.gather(pipe(r, uw, False), pipe(ur, w, True))

        async def serve() -> None:
            await asyncio.start_server(handle, LOOPBACK, self.port)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()


async def running(link: OtaLink) -> asyncio.Task[None]:
    task = asyncio.create_task(link.run())
    assert await link.wait_online(5), link.last_error
    return task


async def retained(port: int, topic: str, timeout: float = 3.0) -> bytes | None:
    """The retained payload of ``topic`` (None if there is none within ``timeout``)."""
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on(t: str, payload: bytes, is_retained: bool) -> None:
        if t == topic and is_retained:
            got.put_nowait(payload)

    link = OtaLink([url(port)], "probe", client_id=f"probe-{os.urandom(3).hex()}",
                   will=False, on_message=on)
    task = await running(link)
    try:
        await link.subscribe(topic, 1)
        return await asyncio.wait_for(got.get(), timeout)
    except TimeoutError:
        return None
    finally:
        await link.stop()
        await task


# =========================================================================== publish + download


@pytest.mark.parametrize("version", [5, 4], ids=["mqtt5", "mqtt311"])
def test_publish_then_download_over_mqtt(version: int, brokers: Callable[..., MosquittoBroker],
                                         tmp_path: Path) -> None:
    broker = brokers()
    data = payload_of(200_000)
    plan = plan_chunks(data, 16 * 1024)
    (tmp_path / "m.cose").write_bytes(b"signed-envelope-bytes")
    (tmp_path / "p.onnx").write_bytes(data)
    order: list[str] = []
    manifests: list[tuple[str, bytes, bool]] = []
    mtopic = manifest_topic(PREFIX, "edge-x86", "anomaly")

    async def main() -> Path:
        async def watch(topic: str, payload: bytes, is_retained: bool) -> None:
            order.append(topic)

        watcher = OtaLink([url(broker.port)], "watcher", will=False, on_message=watch)
        wtask = await running(watcher)
        await watcher.subscribe(f"{PREFIX}/#", 1)
        report = await publish_files(url(broker.port), tmp_path / "m.cose", tmp_path / "p.onnx",
                                     "edge-x86", "anomaly", PREFIX, chunk_size=16 * 1024,
                                     version=version, chunk_digests=plan.chunk_digests)
        assert report.chunks == 13 and report.payload_digest == plan.payload_digest

        async def on_manifest(topic: str, payload: bytes, is_retained: bool) -> None:
            if topic.startswith(f"{PREFIX}/manifest/"):
                manifests.append((topic, payload, is_retained))

        gw = OtaLink([url(broker.port)], "gw-1", version=version, on_message=on_manifest)
        task = await running(gw)
        assert await gw.subscribe(f"{PREFIX}/manifest/edge-x86/+", 1) in (0, 1)
        fetcher = MqttChunkFetcher(gw, window=4)
        path = await asyncio.wait_for(download(plan, fetcher, tmp_path / "partial"), 15)
        assert fetcher.requests == 13  # one subscription per chunk, no retries
        assert not [t for t in gw.subscriptions if "/payload/" in t]  # all unsubscribed
        await asyncio.sleep(0.2)
        await gw.stop()
        await task
        await watcher.stop()
        await wtask
        return path

    path = asyncio.run(main())
    assert hashlib.sha256(path.read_bytes()).digest() == plan.payload_digest
    assert manifests == [(mtopic, b"signed-envelope-bytes", True)]
    chunks = [t for t in order if "/payload/" in t]
    assert len(chunks) == 13 and order.index(mtopic) > max(order.index(t) for t in chunks)
    # the gateway announced itself online, and offline on its clean stop
    assert state_topic(PREFIX, "gw-1") in order
    assert asyncio.run(retained(broker.port, state_topic(PREFIX, "gw-1"))) == \
        json.dumps({"online": False}).encode()


def test_publish_refuses_a_payload_that_is_not_the_manifests() -> None:
    data = payload_of(1000)
    with pytest.raises(ValueError, match="payload digest"):
        asyncio.run(publish_update("mqtt://127.0.0.1:1", b"m", data, gateway_class="c",
                                   component="x", payload_digest=b"\0" * 32))
    with pytest.raises(ValueError, match="one topic level"):
        manifest_topic(PREFIX, "a/b", "x")


def test_corrupted_chunk_is_refused_then_refetched_when_corrected(
        brokers: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    broker = brokers()
    data = payload_of(100_000, seed=3)
    plan = plan_chunks(data, 16 * 1024)
    states: list[tuple[str, str]] = []

    async def main() -> tuple[Path, int]:
        await publish_update(url(broker.port), b"env", data, gateway_class="c",
                             component="anomaly", chunk_size=16 * 1024)
        op = OtaLink([url(broker.port)], "operator", will=False)
        optask = await running(op)
        bad = bytes(b ^ 0x5A for b in data[2 * 16384:3 * 16384])
        await op.publish(chunk_topic(PREFIX, plan.payload_digest, 2), bad, 1, True)

        gw = OtaLink([url(broker.port)], "gw-c")
        task = await running(gw)
        partial = tmp_path / "partial"
        dl = asyncio.create_task(download(plan, MqttChunkFetcher(gw, window=2), partial,
                                          on_state=lambda s, r: states.append((s, r))))
        deadline = time.monotonic() + 10
        while not any("chunk 2 refused" in r for _, r in states):
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert not dl.done()  # it waits for a good chunk 2 and never takes the bad one
        await op.publish(chunk_topic(PREFIX, plan.payload_digest, 2),
                         data[2 * 16384:3 * 16384], 1, True)
        path = await asyncio.wait_for(dl, 10)
        for link, t in ((gw, task), (op, optask)):
            await link.stop()
            await t
        return path, sum(1 for _, r in states if "refused" in r)

    path, refusals = asyncio.run(main())
    assert path.read_bytes() == data
    assert refusals >= 1


# =========================================================================== kill -9 and resume


def _runner(port: int, plan_path: Path, part_dir: Path, bandwidth: float
            ) -> tuple[subprocess.Popen[str], queue.Queue[dict[str, object]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ota_fetch_runner", url(port), str(plan_path),
         str(part_dir), "--bandwidth", str(bandwidth), "--gateway-id", "gw-k"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[dict[str, object]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _next(lines: queue.Queue[dict[str, object]], proc: subprocess.Popen[str],
          timeout: float = 15.0) -> dict[str, object]:
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"runner said nothing for {timeout} s: {err}") from None


def test_kill_9_mid_download_resumes_within_10_percent_extra_bytes(
        brokers: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    broker = brokers()
    data = payload_of(400_000, seed=9)
    plan = plan_chunks(data, 8 * 1024)  # 49 chunks
    plan_path = tmp_path / "plan.json"
    dump_plan(plan, plan_path)
    asyncio.run(publish_update(url(broker.port), b"env", data, gateway_class="c",
                               component="anomaly", chunk_size=8 * 1024))
    part_dir = tmp_path / "partial"
    with CountingRelay(broker.port) as relay:
        proc, lines = _runner(relay.port, plan_path, part_dir, 150_000)
        try:
            done = 0
            while done < 20:
                done = int(_next(lines, proc)["done"])  # type: ignore[call-overload]
            assert asyncio.run(retained(broker.port, state_topic(PREFIX, "gw-k"))) == \
                b'{"online": true}'
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        first = relay.down
        # the will: the broker reports the killed gateway offline (retained)
        deadline = time.monotonic() + 5
        while asyncio.run(retained(broker.port, state_topic(PREFIX, "gw-k"), 1.0)) != \
                b'{"online": false}':
            assert time.monotonic() < deadline, "no will after kill -9"
        with PartialDownload(part_dir, plan) as part:
            held = plan.payload_size - sum(
                min(plan.chunk_size, plan.payload_size - i * plan.chunk_size)
                for i in part.missing())
        assert held >= 20 * 8 * 1024 - 8 * 1024  # what it said it had stored is stored

        proc, lines = _runner(relay.port, plan_path, part_dir, 0)
        try:
            msg = _next(lines, proc)
            assert int(msg.get("done", 49)) >= 19  # type: ignore[call-overload]  # resumed
            while "finished" not in msg:
                msg = _next(lines, proc)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        total = relay.down
    path = Path(str(msg["finished"]))
    assert hashlib.sha256(path.read_bytes()).digest() == plan.payload_digest
    print(f"kill -9 resume: {first} B before the kill, {total - first} B after, "
          f"{total / len(data):.3f} x the payload on the wire")
    assert total <= 1.10 * len(data), f"{total} bytes on the wire for {len(data)}"


# =========================================================================== broker outage


def test_broker_stopped_mid_download_link_reconnects_and_finishes(
        brokers: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    broker = brokers()
    port = broker.port
    data = payload_of(300_000, seed=5)
    plan = plan_chunks(data, 16 * 1024)
    states: list[tuple[str, str]] = []

    async def main() -> tuple[Path, OtaLink]:
        await publish_update(url(port), b"env", data, gateway_class="c", component="a",
                             chunk_size=16 * 1024)
        gw = OtaLink([url(port)], "gw-o", backoff=Backoff(initial=0.05, maximum=0.3))
        task = await running(gw)
        third = asyncio.Event()
        dl = asyncio.create_task(download(
            plan, MqttChunkFetcher(gw, window=2, bandwidth=150_000, chunk_timeout=2.0),
            tmp_path / "p", on_progress=lambda p: third.set() if p.fraction > 0.3 else None,
            on_state=lambda s, r: states.append((s, r))))
        await asyncio.wait_for(third.wait(), 10)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(1.0)
        assert not gw.online and not dl.done()
        assert ("waiting", "the OTA link is offline") in states
        await asyncio.to_thread(lambda: brokers(port))  # back, retained chunks restored
        path = await asyncio.wait_for(dl, 20)
        await gw.stop()
        await task
        return path, gw

    path, gw = asyncio.run(main())
    assert path.read_bytes() == data
    assert gw.connects >= 2 and gw.connect_failures >= 1
    assert ("downloading", "the OTA link is back") in states


# =========================================================================== the cap, the logs


def test_bandwidth_cap_holds_over_mqtt(brokers: Callable[..., MosquittoBroker],
                                       tmp_path: Path) -> None:
    broker = brokers()
    data = payload_of(600_000, seed=11)
    plan: ChunkPlan = plan_chunks(data, 16 * 1024)

    async def main() -> float:
        await publish_update(url(broker.port), b"env", data, gateway_class="c",
                             component="a", chunk_size=16 * 1024)
        gw = OtaLink([url(broker.port)], "gw-b")
        task = await running(gw)
        t0 = time.monotonic()
        await asyncio.wait_for(download(plan, MqttChunkFetcher(gw, window=4, bandwidth=200_000),
                                        tmp_path / "p"), 15)
        took = time.monotonic() - t0
        await gw.stop()
        await task
        return took

    took = asyncio.run(main())
    print(f"600 KB at a 200 KB/s cap: {took:.2f} s = {len(data) / took / 1000:.0f} KB/s")
    assert took >= 2.4, f"{took:.2f} s: the cap let more than 250 KB/s through"
    assert took <= 6.0, f"{took:.2f} s: far below the cap"


def test_connection_errors_logged_once_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    dead = free_port()

    async def main() -> OtaLink:
        link = OtaLink([url(dead)], "gw-d", backoff=Backoff(initial=0.02, maximum=0.05))
        task = asyncio.create_task(link.run())
        await asyncio.sleep(1.0)
        assert not link.online
        assert await link.subscribe(f"{PREFIX}/manifest/c/+", 1) is None  # kept for later
        await link.stop()
        await asyncio.wait_for(task, 5)
        return link

    with caplog.at_level(logging.WARNING, logger="rapidmq_edge.ota.link"):
        link = asyncio.run(main())
    lines = [r for r in caplog.records if "connect to" in r.getMessage()]
    assert link.connect_failures >= 5 and len(lines) == 1, (link.connect_failures, len(lines))
    assert link.subscriptions == {f"{PREFIX}/manifest/c/+": 1}


def test_link_from_the_upstream_settings(brokers: Callable[..., MosquittoBroker]) -> None:
    broker = brokers()
    up = UpstreamSettings("cloud", (url(broker.port),), protocol=4, keep_alive=7)
    link = OtaLink.from_upstream(up, "gw-9")
    assert (link.client_id, link.version, link.keep_alive, link.tls) == ("gw-9-ota", 4, 7, None)

    async def main() -> None:
        task = await running(link)
        assert link.online and link.current_url == url(broker.port)
        await link.stop()
        await task

    asyncio.run(main())
    assert not link.online


def test_chunk_missing_on_the_cluster_is_asked_for_again_until_it_is_there(
        brokers: Callable[..., MosquittoBroker], tmp_path: Path) -> None:
    broker = brokers()
    data = payload_of(64 * 1024, seed=13)
    plan = plan_chunks(data, 16 * 1024)
    states: list[tuple[str, str]] = []

    async def main() -> tuple[Path, int]:
        op = OtaLink([url(broker.port)], "operator", will=False)
        optask = await running(op)
        for i in (0, 1, 3):  # chunk 2 is not there (yet)
            await op.publish(chunk_topic(PREFIX, plan.payload_digest, i),
                             data[i * 16384:(i + 1) * 16384], 1, True)
        gw = OtaLink([url(broker.port)], "gw-t")
        task = await running(gw)
        fetcher = MqttChunkFetcher(gw, window=4, chunk_timeout=0.2, retry_max=0.3)
        dl = asyncio.create_task(download(plan, fetcher, tmp_path / "p",
                                          on_state=lambda s, r: states.append((s, r))))
        deadline = time.monotonic() + 10
        while sum("chunk 2 not received" in r for _, r in states) < 3:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.02)
        assert not dl.done()
        await op.publish(chunk_topic(PREFIX, plan.payload_digest, 2),
                         data[2 * 16384:3 * 16384], 1, True)
        path = await asyncio.wait_for(dl, 10)
        for link, t in ((gw, task), (op, optask)):
            await link.stop()
            await t
        return path, fetcher.requests

    path, requests = asyncio.run(main())
    assert path.read_bytes() == data
    assert requests >= 4 + 3  # four first asks, then chunk 2 again and again
    assert any("attempt 3" in r for _, r in states)


def test_download_over_tls_with_the_upstreams_ca(
        tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]) -> None:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    tls_port = free_port()
    mosquitto_factory(f"listener {tls_port} {LOOPBACK}\ncertfile {cert}\nkeyfile {key}\n"
                      f"cafile {ca}\n")
    assert wait_for_port(LOOPBACK, tls_port, 5)
    tls_url = f"mqtts://{LOOPBACK}:{tls_port}"
    data = payload_of(50_000, seed=17)
    plan = plan_chunks(data, 16 * 1024)
    up = UpstreamSettings("cloud", (tls_url,), ca_file=ca)

    async def main() -> Path:
        await publish_update(tls_url, b"env", data, gateway_class="c", component="a",
                             chunk_size=16 * 1024, tls=ssl.create_default_context(cafile=str(ca)))
        gw = OtaLink.from_upstream(up, "gw-tls")
        task = await running(gw)
        path = await asyncio.wait_for(download(plan, MqttChunkFetcher(gw), tmp_path / "p"), 10)
        await gw.stop()
        await task
        # without the upstream's CA the server is refused
        bad = OtaLink([tls_url], "gw-bad", backoff=FAST)
        btask = asyncio.create_task(bad.run())
        deadline = time.monotonic() + 5
        while bad.last_error is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await bad.stop()
        await btask
        assert "CERTIFICATE_VERIFY_FAILED" in (bad.last_error or "") and bad.connects == 0
        return path

    assert asyncio.run(main()).read_bytes() == data


NATS_BIN = "/usr/sbin/nats-server"


def test_publish_and_download_over_nats_mqtt_311(tmp_path: Path) -> None:
    """NATS speaks MQTT 3.1.1 only (retained messages in JetStream): the same path works."""
    _require_binary(NATS_BIN)
    port, mqtt_port = free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(f"server_name: ota\nlisten: {LOOPBACK}:{port}\n"
                    f"jetstream {{ store_dir: '{tmp_path / 'js'}' }}\n"
                    f"mqtt {{ listen: {LOOPBACK}:{mqtt_port} }}\n")
    with open(tmp_path / "nats.log", "wb") as log_file:
        proc = subprocess.Popen([NATS_BIN, "-c", str(conf)], stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        assert wait_for_port(LOOPBACK, mqtt_port, 20), (tmp_path / "nats.log").read_text()
        data = payload_of(120_000, seed=19)
        plan = plan_chunks(data, 16 * 1024)

        async def main() -> Path:
            await publish_update(url(mqtt_port), b"env", data, gateway_class="c",
                                 component="a", chunk_size=16 * 1024, version=4, timeout=20)
            gw = OtaLink([url(mqtt_port)], "gw-nats", version=4)
            task = await running(gw)
            path = await asyncio.wait_for(
                download(plan, MqttChunkFetcher(gw, window=4), tmp_path / "p"), 20)
            await gw.stop()
            await task
            return path

        assert asyncio.run(main()).read_bytes() == data
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
