"""The group commit of scored messages counts from their arrival, not from their put: the
micro-batch window must not be added to the forward queue's ``commit_delay`` (real SQLite,
real scorers)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from rapidmq_edge.broker.broker import Broker, BrokerLimits
from rapidmq_edge.broker.message import Message
from rapidmq_edge.config_forward import parse_forwarding
from rapidmq_edge.config_intelligence import IntelligenceSettings
from rapidmq_edge.intelligence.runtime import IntelligenceRuntime
from rapidmq_edge.store.forward_queue import ForwardQueue
from rapidmq_edge.uplink.forwarding import StoreAndForward

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
        broker = Broker(BrokerLimits())
        saf = StoreAndForward("gw", fw, tmp_path, broker)
        rt = IntelligenceRuntime(
            IntelligenceSettings(enabled=True, priority="rules", anomaly="rules",
                                 threat="off", batch_window_ms=300.0), broker, saf)
        rt.install()
        t0 = time.monotonic()
        rt.tap(Message("plant/t1", b"21.5", 1))
        rt.tap(Message("plant/t2", b"22.5", 1))
        fut = rt.commit_future()
        assert fut is not None
        await fut  # scored, queued and committed
        elapsed = time.monotonic() - t0
        commits = saf.queue.commits
        got = [m.payload for m in saf.queue.fetch("cloud", 10)]
        await saf.queue.close()
        return elapsed, commits, got

    elapsed, commits, got = asyncio.run(main())
    assert got == [b"21.5", b"22.5"]  # committed, in arrival order
    assert commits == 1  # one group: the window did not split it
    assert 0.45 <= elapsed < 0.75
