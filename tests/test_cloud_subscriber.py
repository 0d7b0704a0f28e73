"""The cloud consumers' MQTT subscriber (``rapidmq_edge.cloud.subscriber``) through an
upstream outage, against a real Mosquitto: one warning when it begins, one line with the
count of failed attempts when the upstream takes the subscription again — not a line per
reconnect attempt (a consumer left running through a night's outage wrote one every 5 s)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from rapidmq_edge.cloud.subscriber import Subscriber

from .conftest import LOOPBACK, MosquittoBroker, free_port, start_mosquitto_on

pytestmark = pytest.mark.timeout(40)


def test_an_outage_is_one_warning_then_one_line_with_its_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rapidmq_edge.cloud.subscriber")
    port = free_port()
    brokers: list[MosquittoBroker] = []

    async def main() -> None:
        sub = Subscriber(f"mqtt://{LOOPBACK}:{port}", "c-outage", [("x/#", 1)], None)
        task = asyncio.create_task(sub.run())
        try:
            await asyncio.sleep(2.0)  # nothing listens: attempts at 0, 0.2, 0.6, 1.4 s
            brokers.append(start_mosquitto_on(tmp_path, port))
            await asyncio.wait_for(sub.subscribed.wait(), 15)
        finally:
            sub.stop()
            await asyncio.wait_for(task, 5)

    try:
        asyncio.run(main())
    finally:
        for b in brokers:
            b.stop()
    lines = [r.getMessage() for r in caplog.records if f"{LOOPBACK}:{port}" in r.getMessage()]
    assert len([m for m in lines if "reconnecting" in m]) == 1, lines
    again = [m for m in lines if "subscribed again" in m]
    assert len(again) == 1, lines
    count = re.search(r"after (\d+) occurrence", again[0])
    assert count is not None and int(count[1]) >= 3, again


def test_the_jetstream_source_through_an_outage_logs_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """No node reachable for 3 s: one warning (the NATS client's attempts, which used to be
    its default traceback per attempt, two a second), however many attempts; and stop()
    ends it while it is still trying (the client retries a first connect for ever: a
    consumer asked to stop during an outage never did)."""
    from rapidmq_edge.cloud.jetstream_source import JetStreamSource

    caplog.set_level(logging.INFO)
    port = free_port()

    async def main() -> None:
        src = JetStreamSource([f"nats://{LOOPBACK}:{port}"], "S", "d", "x.>")
        task = asyncio.create_task(src.run())
        await asyncio.sleep(3.0)
        src.stop()
        await asyncio.wait_for(task, 3)

    asyncio.run(main())
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("rapidmq_edge")]
    assert len(ours) == 1 and "nats client: ConnectionRefusedError" in ours[0], ours
    assert not [r for r in caplog.records if r.name.startswith("nats")], "library tracebacks"
