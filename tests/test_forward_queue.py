"""Durable store-and-forward queue: real SQLite files, ``asyncio.run`` inside each test."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapidmq_edge.mqtt.properties import encode_properties
from rapidmq_edge.store.forward_queue import (
    ClassLimits,
    ForwardQueue,
    QueueError,
    QueueFull,
)

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A settable clock for ``now=``."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def committed(q: ForwardQueue) -> None:
    fut = q.commit_future()
    if fut is not None:
        await fut


def drain(q: ForwardQueue, up: str, limit: int = 10_000) -> list[int]:
    return [m.id for m in q.fetch(up, limit)]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def main() -> None:
        q = ForwardQueue(path, commit_delay=0.001)
        assert q.commit_future() is None
        props = encode_properties({"content_type": "text/plain", "user_property": [("k", "v")]})
        mid = q.put("cloud", 2, "a/b", b"hello", qos=1, props=props)
        assert q.fetch("cloud", 10) == []  # not committed yet: never handed out
        await committed(q)
        assert q.commit_future() is None
        [m] = q.fetch("cloud", 10)
        assert (m.id, m.upstream, m.priority, m.topic, m.payload, m.qos) == (
            mid, "cloud", 2, "a/b", b"hello", 1)
        assert m.props == props  # opaque bytes, handed back as they were put
        assert m.expires_at is None
        assert q.fetch("cloud", 10) == []  # in flight
        waiting = asyncio.ensure_future(q.wait_for_data("cloud"))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        q.requeue("cloud", [mid])
        await asyncio.wait_for(waiting, 1)
        assert [m.id for m in q.fetch("cloud", 10)] == [mid]
        waiting = asyncio.ensure_future(q.wait_for_data("cloud"))
        q.put("cloud", 1, "x", b"y")
        await asyncio.wait_for(waiting, 1)  # woken by the commit
        assert [m.payload for m in q.fetch("cloud", 10)] == [b"y"]
        q.ack("cloud", [mid, mid + 1])
        assert q.stats()["messages"] == 0
        await committed(q)
        await q.close()
        q = ForwardQueue(path)
        assert q.fetch("cloud", 10) == []
        await q.close()

    asyncio.run(main())


def test_ids_monotonic_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def main() -> None:
        q = ForwardQueue(path, durability="normal", commit_delay=0)
        ids = [q.put("u", 1, "t", b"x") for _ in range(5)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        await committed(q)
        got = drain(q, "u")
        q.ack("u", [max(got)])  # delete the highest id
        await q.close()
        q = ForwardQueue(path, durability="normal")
        new = q.put("u", 1, "t", b"y")
        assert new > max(ids)
        await q.close()

    asyncio.run(main())


def test_drain_order(tmp_path: Path) -> None:
    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0)
        put = {p: [] for p in range(4)}  # type: dict[int, list[int]]
        for i in range(20):
            p = (i * 7) % 4
            put[p].append(q.put("u", p, f"t/{i}", b"%d" % i))
        await committed(q)
        expect = sorted(put[0], reverse=True) + put[1] + put[2] + put[3]
        got = [m.id for m in q.fetch("u", 7)] + [m.id for m in q.fetch("u", 100)]
        assert got == expect
        await q.close()

    asyncio.run(main())


def test_upstreams_are_independent(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def main() -> None:
        q = ForwardQueue(path, commit_delay=0)
        a = [q.put("A", 2, "t", b"a%d" % i) for i in range(50)]
        b = [q.put("B", 2, "t", b"b%d" % i) for i in range(50)]
        await committed(q)
        assert drain(q, "A") == a
        q.ack("A", a)
        q.ack("B", a)  # ids of another upstream: ignored
        await committed(q)
        st = q.stats()["upstreams"]
        assert st["A"][2]["messages"] == 0 and st["B"][2]["messages"] == 50
        await q.close()
        q = ForwardQueue(path)
        assert drain(q, "A") == []
        assert [m.payload for m in q.fetch("B", 100)] == [b"b%d" % i for i in range(50)]
        assert drain(q, "B") == []
        assert drain(q, "B") == [] and q.in_flight("B") == b
        await q.close()

    asyncio.run(main())


def test_requeue_after_dropped_connection(tmp_path: Path) -> None:
    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0)
        alarms = [q.put("u", 0, "al", b"!") for _ in range(3)]
        ids = [q.put("u", 2, "t", b"x") for _ in range(10)]
        await committed(q)
        first = drain(q, "u", 8)
        assert first == alarms[::-1] + ids[:5]
        q.ack("u", first[:2])
        later = q.put("u", 2, "t", b"late")
        await committed(q)
        q.requeue("u", [first[4], first[6]])  # partial requeue, out of order
        q.requeue("u", first[2:])  # the link dropped: everything unacked back
        assert q.in_flight("u") == []
        assert drain(q, "u") == [alarms[0]] + ids + [later]
        await q.close()

    asyncio.run(main())


def test_drop_oldest_limits(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        classes = {
            1: ClassLimits(max_messages=3),
            2: ClassLimits(max_bytes=3 * (1 + 100)),  # topic + payload (+ props: none)
            3: ClassLimits(max_age=10),
        }
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0, classes=classes, now=clock)
        c1 = [q.put("u", 1, "t", b"x") for _ in range(5)]
        c2 = [q.put("u", 2, "t", b"y" * 100) for _ in range(5)]
        c3 = [q.put("u", 3, "t", b"z") for _ in range(2)]
        clock.t += 11
        c3 += [q.put("u", 3, "t", b"z")]  # the two older ones are now too old
        await committed(q)
        assert q.stats()["drops"]["dropped_oldest"] == 2 + 2 + 2
        assert drain(q, "u") == c1[2:] + c2[2:] + c3[2:]
        await q.close()

    asyncio.run(main())


def test_refuse_new_limits(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0, now=clock, classes={
            0: ClassLimits(max_messages=2, policy="refuse_new"),
            1: ClassLimits(max_bytes=8, policy="refuse_new"),
            2: ClassLimits(max_age=5, policy="refuse_new"),
        })
        q.put("u", 0, "a", b"1")
        q.put("u", 0, "a", b"2")
        with pytest.raises(QueueFull, match="max_messages"):
            q.put("u", 0, "a", b"3")
        q.put("other", 0, "a", b"1")  # limits are per upstream
        q.put("u", 1, "t", b"12345")  # 1 + 5 = 6 B (no props)
        with pytest.raises(QueueFull, match="max_bytes"):
            q.put("u", 1, "t", b"12")
        q.put("u", 2, "t", b"old")
        clock.t += 6
        with pytest.raises(QueueFull, match="max_age"):
            q.put("u", 2, "t", b"new")
        with pytest.raises(QueueFull):
            q.put("u", 1, "t", b"x" * 20)  # larger than the whole class
        st = q.stats()
        assert st["drops"]["refused"] == 4 and st["drops"]["dropped_oldest"] == 0
        assert st["upstreams"]["u"][0]["messages"] == 2
        assert st["upstreams"]["u"][2]["oldest_age"] == 6
        await committed(q)
        q.ack("u", drain(q, "u"))  # acked: room again
        q.put("u", 0, "a", b"3")
        q.put("u", 2, "t", b"new")
        await q.close()

    asyncio.run(main())


def test_global_byte_bound(tmp_path: Path) -> None:
    async def main() -> None:
        size = 1 + 97  # 98 B per message (topic + payload, no props)
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0, max_bytes=10 * size)
        c0 = [q.put("u", 0, "a", b"!" * 97) for _ in range(3)]
        c2 = [q.put("u", 2, "t", b"n" * 97) for _ in range(3)]
        c3 = [q.put("v", 3, "t", b"b" * 97) for _ in range(4)]
        assert q.stats()["bytes"] == 10 * size
        assert q.stats()["upstreams"]["v"][3]["messages"] == len(c3)
        c2 += [q.put("u", 2, "t", b"n" * 97) for _ in range(5)]  # evicts bulk (v) first
        assert q.stats()["drops"]["dropped_oldest"] == 5
        assert q.stats()["bytes"] == 10 * size
        with pytest.raises(QueueFull):  # only class 0 and 2 left: a bulk put can't evict
            q.put("u", 3, "t", b"b" * 97)
        c0 += [q.put("u", 0, "a", b"!" * 97) for _ in range(7)]  # alarms evict class 2
        with pytest.raises(QueueFull):  # all alarms, refuse_new: nothing evictable
            q.put("u", 0, "a", b"!" * 97)
        await committed(q)
        assert drain(q, "u") == c0[::-1]
        assert drain(q, "v") == []
        st = q.stats()
        assert st["drops"]["refused"] == 2
        assert st["drops"]["dropped_oldest"] == 5 + 7
        await q.close()

    asyncio.run(main())


def test_ttl_expiry_counted(tmp_path: Path) -> None:
    clock = Clock()

    async def main() -> None:
        q = ForwardQueue(tmp_path / "q.db", commit_delay=0, now=clock)
        short = q.put("u", 1, "t", b"s", ttl=5)
        keep = q.put("u", 1, "t", b"k", ttl=60)
        forever = q.put("u", 0, "t", b"f")
        await committed(q)
        clock.t += 10
        msgs = q.fetch("u", 10)
        assert [m.id for m in msgs] == [forever, keep]
        assert msgs[1].expires_at == pytest.approx(1_000_060.0)
        st = q.stats()
        assert st["drops"]["expired"] == 1 and st["messages"] == 2
        await committed(q)
        await q.close()
        q = ForwardQueue(tmp_path / "q.db", now=clock)
        assert short not in drain(q, "u")
        await q.close()

    asyncio.run(main())


def test_restart_restores_unacked_and_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "q.db"

    async def main() -> None:
        q = ForwardQueue(path, commit_delay=0)
        ids = [q.put("u", i % 3 + 1, f"t/{i}", bytes([i]) * 10, ttl=3600) for i in range(30)]
        await committed(q)
        sent = drain(q, "u", 12)
        q.ack("u", sent[:4])
        await q.close()
        q = ForwardQueue(path)
        again = q.fetch("u", 100)
        assert sorted(m.id for m in again) == sorted(set(ids) - set(sent[:4]))
        assert set(sent[4:]) <= {m.id for m in again}  # in flight before: sent again
        assert all(m.payload == bytes([ids.index(m.id)]) * 10 for m in again)
        await q.close()

    asyncio.run(main())


CHILD = r"""
import asyncio, os, sys
from pathlib import Path
from rapidmq_edge.store.forward_queue import ForwardQueue

async def producer(q, n):
    i = 0
    while True:
        ids = [q.put("up", (n + i) % 4, "t/%d" % n, b"p" * 200) for _ in range(20)]
        i += 1
        await q.commit_future()
        print(" ".join(map(str, ids)), flush=True)
        if sys.argv[3] == "exit" and i >= 20:
            os._exit(0)

async def main():
    q = ForwardQueue(Path(sys.argv[1]), durability=sys.argv[2], commit_delay=0.002)
    await asyncio.gather(*(producer(q, n) for n in range(8)))

asyncio.run(main())
"""


@pytest.mark.parametrize(("durability", "how"), [
    ("fsync", "kill"), ("normal", "kill"), ("fsync", "exit"),
])
def test_crash_keeps_every_acknowledged_id(tmp_path: Path, durability: str, how: str) -> None:
    path = tmp_path / "q.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), durability, how],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if how == "kill" and len(lines) >= 60:
            proc.send_signal(signal.SIGKILL)
            break
    rest, _ = proc.communicate(timeout=30)
    lines += rest.splitlines(keepends=True)
    printed = {int(x) for line in lines if line.endswith("\n") for x in line.split()}
    assert len(printed) >= 60 * 20

    async def check() -> None:
        q = ForwardQueue(path)
        stored = set(drain(q, "up", 1_000_000))
        assert printed <= stored
        await q.close()

    asyncio.run(check())


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 256 KiB tmpfs when running as root (None otherwise); unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True,
    ).returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _check_disk_full(path: Path, fill: object, free: object) -> None:
    async def main() -> None:
        q = ForwardQueue(path, commit_delay=0.001)
        ok: list[int] = []
        failed = 0
        fill(q)  # type: ignore[operator]
        for _ in range(400):
            batch = [q.put("u", 2, "t", os.urandom(1000)) for _ in range(5)]
            try:
                await committed(q)
                ok += batch
            except QueueError:
                failed += 1
                break
        assert failed, "the store never filled up"
        st = q.stats()
        assert st["commit_failures"] == 1
        assert st["messages"] == len(ok) and st["pending_bytes"] == 0
        assert st["drops"]["not_stored"] == 5
        assert drain(q, "u", 10_000) == ok
        free(q)  # type: ignore[operator]
        q.ack("u", ok)
        await committed(q)
        more = q.put("u", 1, "t", b"after")
        await committed(q)
        assert drain(q, "u") == [more]
        await q.close()
        q = ForwardQueue(path)
        assert drain(q, "u") == [more]
        await q.close()

    asyncio.run(main())


def test_disk_full_fails_commit(small_fs: Path | None, tmp_path: Path) -> None:
    if small_fs is None:
        pytest.skip("needs root to mount a small tmpfs (see the max_page_count test)")
    filler = small_fs / "filler"

    def fill(q: ForwardQueue) -> None:
        filler.write_bytes(b"\0" * 64 * 1024)

    def free(q: ForwardQueue) -> None:
        filler.unlink()

    _check_disk_full(small_fs / "q.db", fill, free)


def test_database_full_fails_commit(tmp_path: Path) -> None:
    def fill(q: ForwardQueue) -> None:
        pages = q._db.execute("PRAGMA page_count").fetchone()[0]
        q._db.execute(f"PRAGMA max_page_count = {pages + 30}")

    def free(q: ForwardQueue) -> None:
        q._db.execute("PRAGMA max_page_count = 1000000")

    _check_disk_full(tmp_path / "q.db", fill, free)


def _make_queue_file(path: Path, n: int) -> list[int]:
    async def main() -> list[int]:
        q = ForwardQueue(path, durability="normal", commit_delay=0)
        ids = [q.put("u", 2, f"t/{i}", b"%06d" % i * 30) for i in range(n)]
        q.stage("summary:s/1", b"window")
        await committed(q)
        await q.close()
        return ids

    return asyncio.run(main())


def _quarantined(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if ".corrupt-" in p.name)


def test_damaged_pages_are_salvaged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.db"
    ids = _make_queue_file(path, 3000)
    original = path.read_bytes()
    with open(path, "r+b") as f:  # garbage over some whole pages in the middle (a cell cut
        f.seek(len(original) // 2 // 4096 * 4096)  # in two would keep garbage SQLite can't see)
        f.write(os.urandom(3 * 4096))

    async def main() -> None:
        q = ForwardQueue(path)
        got = q.fetch("u", 10_000)
        assert 0 < len(got) < len(ids)
        assert all(m.payload == b"%06d" % ids.index(m.id) * 30 for m in got)
        assert q.quarantined is not None and q.quarantined.exists()
        assert q.stats()["quarantined"] == str(q.quarantined)
        q.ack("u", [m.id for m in got[:10]])
        new = q.put("u", 2, "t", b"after")
        assert new > max(ids)  # the sequence survived the salvage
        assert q.load_state("summary:") == {"summary:s/1": b"window"}  # so did the state
        await committed(q)
        await q.close()
        q = ForwardQueue(path)  # the salvaged database is sound
        assert q.quarantined is None
        assert len(drain(q, "u", 10_000)) == len(got) - 10 + 1
        await q.close()

    asyncio.run(main())
    [damaged] = [p for p in _quarantined(path) if p.name.endswith(tuple("0123456789Z"))]
    assert damaged.read_bytes()[:100] == original[:100]  # kept, not deleted
    assert any(str(damaged) in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


def test_garbage_file_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.db"
    junk = os.urandom(64 * 1024)
    path.write_bytes(junk)
    (tmp_path / "q.db-wal").write_bytes(os.urandom(5000))

    async def main() -> None:
        q = ForwardQueue(path)
        assert q.fetch("u", 10) == []
        mid = q.put("u", 1, "t", b"works")
        await committed(q)
        assert drain(q, "u") == [mid]
        await q.close()

    asyncio.run(main())
    names = {p.name for p in _quarantined(path)}
    damaged = [p for p in _quarantined(path) if p.name.endswith("Z")]
    assert len(damaged) == 1 and damaged[0].read_bytes() == junk
    assert damaged[0].name + "-wal" in names
    assert any("damaged" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
