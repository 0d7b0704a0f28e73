"""The JetStream ingest source (issue 16): NATS' MQTT subjects mapped back to topics and the
filter subject (sans-I/O). The source on a live 3-node cluster, under kills:
tests/test_cloud_nats_chaos.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rapidmq_edge.cli.cloud import register, run
from rapidmq_edge.cloud.jetstream_source import filter_to_subject, subject_to_topic
from rapidmq_edge.cloud.verify import Ingest
from rapidmq_edge.crypto.keys import RecipientKeyring

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
