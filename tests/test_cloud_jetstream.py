"""The JetStream ingest source (issue 16): NATS' MQTT subjects mapped back to topics and the
filter subject (sans-I/O). The source on a live 3-node cluster, under kills:
tests/test_cloud_nats_chaos.py."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapidmq_edge.cli.cloud import register, run
from rapidmq_edge.cloud.jetstream_source import (
    JetStreamSource,
    filter_to_subject,
    subject_to_topic,
)
from rapidmq_edge.cloud.subscriber import Delivery
from rapidmq_edge.cloud.verify import Ingest
from rapidmq_edge.crypto.keys import RecipientKeyring

from .cloud_nats import NATS_BIN, nats_available
from .conftest import LOOPBACK, free_port, wait_for_port
from .test_cloud_shared_state import GW, _batches


@pytest.mark.parametrize(("subject", "topic"), [
    ("$MQTT.msgs.edge.gw-1.a.b", "edge/gw-1/a/b"),  # what nats-server 2.9.10 stored (inspected)
    ("$MQTT.msgs.edge./.a./", "edge//a/"),  # empty levels
    ("$MQTT.msgs./.lead", "/lead"),
    ("$MQTT.msgs.a.b//c", "a/b.c"),  # 2.10+ escapes a '.' in a topic as '//'
])
def test_subject_maps_back_to_the_mqtt_topic(subject: str, topic: str) -> None:
    assert subject_to_topic(subject) == topic


def test_subject_outside_the_mqtt_stream_and_unstorable_filters_are_refused() -> None:
    with pytest.raises(ValueError, match="not under"):
        subject_to_topic("orders.new")
    assert filter_to_subject("edge/+/#") == "$MQTT.msgs.edge.*.>"
    with pytest.raises(ValueError, match="'.'"):
        filter_to_subject("edge/a.b/#")


@pytest.mark.parametrize("judge", [True, False])
def test_any_consumer_keeps_every_batch_only_the_judge_reports_a_chain_gap(judge: bool) -> None:
    """A shared durable hands any message to any consumer, so every consumer keeps every batch
    (``owns`` stays None: a message of any gateway can be verified wherever it lands), while a
    batch-seq gap is reported by the gateway's judge (``--partition I/N``) alone: one report,
    not one per consumer, and not by a consumer that saw the gap only through the shared
    state while the batch was still unacknowledged at another one."""
    batches, ids = _batches(3)
    now = [0.0]
    ing = Ingest(ids, RecipientKeyring([]), grace=1.0, chain_start=0, clock=lambda: now[0],
                 judges=lambda gw: judge)
    ing.add_control("batch", batches[0])
    ing.add_control("batch", batches[2])
    now[0] = 30.0
    _, reports = ing.poll()
    assert GW in ing.gateways and sorted(ing.gateways[GW].batches) == [0, 2]  # kept by all
    gap = ("missing-batch", "batches 1..1 never arrived")
    assert (gap in [(r.kind, r.detail) for r in reports]) is judge


def test_cli_jetstream_source_needs_servers_and_durable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    base = ["cloud", "ingest", "--keys-dir", str(tmp_path), "--out", str(tmp_path / "o.jsonl")]
    for extra, reason in ((["--source", "jetstream", "--servers", "nats://127.0.0.1:1"],
                           "needs --servers URLS and --durable NAME"),
                          ([], "--upstream URL is required")):
        assert run(parser.parse_args(base + extra)) == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()  # refused before anything was opened


@pytest.fixture
def nats_js(tmp_path: Path) -> Iterator[str]:
    """One JetStream nats-server on 127.0.0.1 (its URL); stopped at the end."""
    if not nats_available():
        pytest.skip("nats-server not installed")
    port = free_port()
    proc = subprocess.Popen([NATS_BIN, "-js", "-sd", str(tmp_path / "js"), "-a", LOOPBACK,
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert wait_for_port(LOOPBACK, port, 10), "nats-server did not listen"
        yield f"nats://{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def _take(src: JetStreamSource, n: int, timeout: float) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(out) < n and asyncio.get_running_loop().time() < deadline:
        out += await src.take(n - len(out), 0.2)
    return out


async def _take_distinct(src: JetStreamSource, n: int, timeout: float) -> list[Delivery]:
    """Deliveries until ``n`` distinct payloads came (or ``timeout``)."""
    out: list[Delivery] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while (len({d.payload for d in out}) < n
           and asyncio.get_running_loop().time() < deadline):
        out += await src.take(n, 0.2)
    return out


@pytest.mark.interop
@pytest.mark.timeout(60)
def test_what_a_dead_consumer_left_unacknowledged_goes_to_the_other_one(nats_js: str) -> None:
    """Two sources on ONE durable (the stream built like NATS' MQTT one: interest retention,
    ``Nmqtt-Pub`` headers): A fetches 6, acknowledges (= committed) 3 and dies; B gets exactly
    the other 3 after ``ack_wait``, topics mapped back; once B acknowledges them the interest
    stream holds nothing. Fails if acks were sent before the commit (B would get none) or
    never (B would get all 6)."""
    import nats
    from nats.js.api import RetentionPolicy

    async def main() -> None:
        nc = await nats.connect(nats_js)
        js = nc.jetstream()
        await js.add_stream(name="$MQTT_msgs", subjects=["$MQTT.msgs.>"],
                            retention=RetentionPolicy.INTEREST)

        def source() -> JetStreamSource:
            return JetStreamSource([nats_js], "$MQTT_msgs", "ingest", "$MQTT.msgs.edge.*.>",
                                   ack_wait=1.0, fetch=4)

        a, b = source(), source()
        task = asyncio.ensure_future(a.run())
        await asyncio.wait_for(a.subscribed.wait(), 10)
        for i in range(6):
            await js.publish(f"$MQTT.msgs.edge.{GW}./.t{i}", b"p%d" % i,
                             headers={"Nmqtt-Pub": "1"})
        got = await _take(a, 6, 10)
        assert [(d.topic, d.payload, d.qos) for d in got] == [
            (f"edge/{GW}//t{i}", b"p%d" % i, 1) for i in range(6)]
        assert await a.acknowledge(got[:3]) == 3
        a.stop()
        await asyncio.wait_for(task, 10)
        task = asyncio.ensure_future(b.run())
        try:
            # redelivered after ack_wait: the 3 unacknowledged (one may come to B twice
            # when B holds it past ack_wait itself, as a slow commit would: a duplicate by id)
            again = await _take_distinct(b, 3, 8)
            assert sorted({d.payload for d in again}) == [b"p3", b"p4", b"p5"]
            assert await b.acknowledge(again) == len(again)
            late = await _take(b, 1, 2.5)  # past ack_wait: nothing acknowledged comes back
            assert not {d.payload for d in late} & {b"p0", b"p1", b"p2"}, late
            await b.acknowledge(late)
            for _ in range(50):
                if (await js.stream_info("$MQTT_msgs")).state.messages == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await js.stream_info("$MQTT_msgs")).state.messages == 0
        finally:
            b.stop()
            await asyncio.wait_for(task, 10)
            await nc.close()

    asyncio.run(main())
