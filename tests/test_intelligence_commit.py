"""The group commit of scored messages counts from their arrival, not from their put: the
micro-batch window must not be added to the forward queue's ``commit_delay`` (real SQLite,
real scorers)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.message import Message
from rapidmq_edge.config.forwarding import parse_forwarding
from rapidmq_edge.config.intelligence import IntelligenceSettings
from rapidmq_edge.gateway.forwarding import build_forward_path
from rapidmq_edge.pipeline.intelligence_runtime import IntelligenceRuntime
from rapidmq_edge.store.forward_queue import ForwardQueue

from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(60)


def test_commit_arrived_counts_from_arrival(tmp_path: Path) -> None:
    """Rows put late commit as if put on arrival: ``commit_delay`` after it, or at once when
    a commit ended since (they would have been written right after that one)."""
    async def main() -> tuple[float, float, float, bool]:
        q = ForwardQueue(tmp_path / "q.db", "normal", commit_delay=0.6)
        q.commit_arrived(time.monotonic())  # nothing put: nothing armed, nothing to wait
        nothing = q.commit_future() is None

        async def put(payload: bytes, since: float) -> float:
            t0 = time.monotonic()
            q.put("u", 2, "t", payload)
            q.commit_arrived(since)
            fut = q.commit_future()
            assert fut is not None
            await fut
            return time.monotonic() - t0

        waited = await put(b"a", time.monotonic() - 0.55)  # arrived 0.55 s ago
        fresh = await put(b"b", time.monotonic())  # never later than commit_delay
        arrived = time.monotonic()
        await asyncio.sleep(0.05)
        q.put("u", 2, "t", b"c")  # another put's commit runs meanwhile
        q.commit_arrived(time.monotonic() - 0.6)
        fut = q.commit_future()
        assert fut is not None
        await fut
        after_commit = await put(b"d", arrived)  # a commit ended since it arrived: at once
        assert [m.payload for m in q.fetch("u", 10)] == [b"a", b"b", b"c", b"d"]
        await q.close()
        return waited, fresh, after_commit, nothing

    waited, fresh, after_commit, nothing = asyncio.run(main())
    assert nothing
    assert waited < 0.4  # not the 0.6 s commit_delay again
    assert 0.55 <= fresh < 2.0
    assert after_commit < 0.3  # not the ~0.5 s left of its own commit_delay


def test_batch_window_is_part_of_the_commit_delay(tmp_path: Path) -> None:
    """Window 0.3 s, commit delay 0.5 s: the PUBACK's future resolves ~0.5 s after the
    message arrived (was 0.8 s: the queue's wait started again at the put)."""
    fw = parse_forwarding({
        "upstream": [{"name": "cloud", "urls": ["mqtt://127.0.0.1:1"]}],
        "forward": [{"filter": "#", "upstream": "cloud"}],
        "queue": {"durability": "normal", "commit_delay_ms": 500},
    }, tmp_path)

    async def main() -> tuple[float, int, list[bytes]]:
        path = build_forward_path("gw", fw, tmp_path)
        broker = Broker(BrokerLimits())
        rt = IntelligenceRuntime(
            IntelligenceSettings(enabled=True, priority="rules", anomaly="rules",
                                 threat="off", batch_window_ms=300.0),
            path.forwarder, path.queue, broker.publish, fw.upstreams, "gw", tmp_path)
        t0 = time.monotonic()
        rt.tap(Message("plant/t1", b"21.5", 1))
        rt.tap(Message("plant/t2", b"22.5", 1))
        fut = rt.commit_future()
        assert fut is not None
        await fut  # scored, queued and committed
        elapsed = time.monotonic() - t0
        commits = path.queue.commits
        got = [m.payload for m in path.queue.fetch("cloud", 10)]
        await path.queue.close()
        return elapsed, commits, got

    elapsed, commits, got = asyncio.run(main())
    assert got == [b"21.5", b"22.5"]  # committed, in arrival order
    assert commits == 1  # one group: the window did not split it
    assert 0.45 <= elapsed < 0.75


class _Publisher:
    """A paho client recording each PUBACK's reason code by message id."""

    def __init__(self, port: int, name: str, protocol: int) -> None:
        self.acks: dict[int, int] = {}
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                             protocol=protocol)
        self.c.on_publish = self._acked
        ready = threading.Event()
        self.c.on_connect = lambda *a: ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert ready.wait(10)

    def _acked(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        with self.lock:
            self.acks[mid] = rc.value if hasattr(rc, "value") else int(rc)

    def publish(self, topic: str, payload: bytes) -> int:
        return self.c.publish(topic, payload, qos=1).mid

    def wait(self, mids: list[int], seconds: float = 10.0) -> dict[int, int]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self.lock:
                if all(m in self.acks for m in mids):
                    break
            time.sleep(0.02)
        with self.lock:
            return {m: self.acks[m] for m in mids if m in self.acks}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_refused_message_in_a_scored_batch_fails_only_its_own_publisher(
        tmp_path: Path) -> None:
    """One micro-batch (a 400 ms window) holds a message the queue refuses (its class is
    full, ``refuse_new``) and messages it stores: only the refused one's publisher hears
    0x97 (MQTT 5); the others are acknowledged, by a 5.0 and by a 3.1.1 client."""
    gw = GatewayProcess(tmp_path, {
        "upstream": [{"name": "cloud", "urls": ["mqtt://127.0.0.1:1"]}],  # down: all stays
        "forward": [{"filter": "bulk/#", "upstream": "cloud", "priority": "bulk"},
                    {"filter": "plant/#", "upstream": "cloud"}],
        "queue": {"durability": "normal", "bulk": {"max_messages": 1,
                                                   "policy": "refuse_new"}},
        "intelligence": {"enabled": True, "priority": "rules", "anomaly": "off",
                         "threat": "off", "batch_window_ms": 400.0},
    }).start()
    a = b = c = None
    try:
        a = _Publisher(gw.port, "dev-a", mqtt.MQTTv5)
        b = _Publisher(gw.port, "dev-b", mqtt.MQTTv5)
        c = _Publisher(gw.port, "dev-c", mqtt.MQTTv311)
        first = a.publish("bulk/1", b"fills the bulk class")
        assert a.wait([first]) == {first: 0x10}  # stored (no local subscriber)
        refused = a.publish("bulk/2", b"over the bulk class limit")
        ok5 = b.publish("plant/t1", b"21.5")
        ok3 = c.publish("plant/t2", b"22.5")
        assert b.wait([ok5]) == {ok5: 0x10}  # was 0x97: the batch's refusal was everyone's
        assert c.wait([ok3]) == {ok3: 0}
        assert a.wait([refused]) == {refused: 0x97}
    finally:
        for p in (a, b, c):
            if p is not None:
                p.close()
        gw.stop()
    with sqlite3.connect(gw.data_dir / "forward.db") as db:
        topics = sorted(r[0] for r in db.execute("SELECT topic FROM messages"))
    assert [t.rsplit("/", 2)[-2:] for t in topics] == [["bulk", "1"], ["plant", "t1"],
                                                       ["plant", "t2"]]


def test_staged_state_commits_with_the_puts_and_survives_reopen(tmp_path: Path) -> None:
    """``stage()`` alone makes a commit future (what waits for it is acknowledged only once
    it is on disk); a key set and a put in one group land together; None deletes."""
    async def main() -> tuple[bool, dict[str, bytes]]:
        q = ForwardQueue(tmp_path / "q.db", "normal", commit_delay=0.01)
        q.stage("summary:a", b"1")
        fut = q.commit_future()
        assert fut is not None
        await fut
        q.put("u", 2, "t", b"m")
        q.stage("summary:a", None)
        q.stage("summary:b", b"2")
        q.stage("other", b"3")
        fut = q.commit_future()
        assert fut is not None
        commits = q.commits
        await fut
        one_group = q.commits == commits + 1
        await q.close()
        q = ForwardQueue(tmp_path / "q.db", "normal")
        state = q.load_state("summary:")
        assert [m.payload for m in q.fetch("u", 10)] == [b"m"]
        await q.close()
        return one_group, state

    one_group, state = asyncio.run(main())
    assert one_group
    assert state == {"summary:b": b"2"}
