"""``cloud ingest`` acknowledges after it is safe: real Mosquitto, real consumer subprocesses
killed with SIGKILL, SQLite and PostgreSQL state (issue 16, parts 1 and 2)."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .cloud_helpers import (
    CloudKeys,
    Consumer,
    Publisher,
    StreamMaker,
    cloud_keys,
    pg_dsn,  # noqa: F401 - fixture
    pg_rows,
    pg_server,  # noqa: F401 - fixture
)
from .conftest import MosquittoBroker

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

BROKER_CONF = "max_queued_messages 100000\nmax_inflight_messages 100\n"
BAD_KINDS = {"tampered", "unverifiable", "missing-message", "missing-batch", "wrong-key",
             "chain-broken", "replay"}


def _sqlite(path: Path, sql: str) -> list[tuple[object, ...]]:
    if not path.exists():
        return []
    db = sqlite3.connect(str(path), timeout=10)
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        db.close()


def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stream(keys: CloudKeys, gw: str, n: int, batch: int) -> list[tuple[str, bytes, str | None]]:
    mk = StreamMaker(keys, gw)
    out = [mk.session()]
    for i in range(n):
        out.append(mk.message(f"{gw}-{i}".encode()))
        if (i + 1) % batch == 0 or i == n - 1:
            out.append(mk.batch())
    return out


def test_waiting_messages_are_durable_state_a_kill9_and_a_clean_restart_keep_them(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """Messages wait for their batch in the consumer's SQLite state: acknowledged upstream,
    then SIGKILL, a restart on a *clean* session (the broker forgets everything
    unacknowledged), then the batch header: all verified from the state, nothing reported."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    out = tmp_path / "out.sqlite"
    c = Consumer(tmp_path, broker.port, keys, str(out), "c1").start()
    pub = Publisher(broker.port)
    try:
        stream = _stream(keys, "gw-a", 30, 30)
        pub.send(stream[:-1])  # session + 30 messages, no batch yet
        pub.wait_acked()
        _until(lambda: len(_sqlite(out, "SELECT id FROM cloud_pending")) == 30, 15, "30 pending")
        time.sleep(0.3)  # the acknowledgements follow the commit
        c.kill9()
        assert _sqlite(out, "SELECT COUNT(*) FROM messages") == [(0,)]
        c.args += ["--session-expiry", "0"]  # clean start: only the state can hold them
        c.start()
        pub.send(stream[-1:])
        pub.wait_acked()
        _until(lambda: _sqlite(out, "SELECT COUNT(*) FROM messages") == [(30,)], 20,
               "30 verified rows")
    finally:
        pub.close()
        c.stop()
    rows = _sqlite(out, "SELECT payload, verdict, proof FROM messages ORDER BY id")
    assert sorted(bytes(r[0]) for r in rows) == sorted(f"gw-a-{i}".encode() for i in range(30))
    assert {(r[1], r[2]) for r in rows} == {("verified", "leaf")}
    assert _sqlite(out, "SELECT COUNT(*) FROM cloud_pending") == [(0,)]
    assert not set(c.report_kinds()) & BAD_KINDS, c.report_kinds()


def test_kill9_of_the_consumer_at_random_moments_loses_nothing(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """A stream of 2 gateways (sealed, signed, 20 per batch) while the consumer is killed
    with SIGKILL 5 times at random moments and restarted: every message exactly once."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    out = tmp_path / "out.sqlite"
    c = Consumer(tmp_path, broker.port, keys, str(out), "c1").start()
    pub = Publisher(broker.port)
    streams = [_stream(keys, gw, 300, 20) for gw in ("gw-a", "gw-b")]
    items = [x for pair in zip(*streams, strict=True) for x in pair]
    rng = random.Random(16)
    done = threading.Event()

    def publish() -> None:
        for i in range(0, len(items), 10):
            pub.send(items[i:i + 10])
            time.sleep(0.015)
        done.set()

    t = threading.Thread(target=publish)
    t.start()
    try:
        while not done.is_set() or c.kills < 5:
            time.sleep(rng.uniform(0.1, 0.9))
            if c.kills < 5:
                c.kill9()
                c.start(wait=rng.random() < 0.5)  # sometimes killed again before subscribing
        t.join(30)
        pub.wait_acked(30)
        _until(lambda: _sqlite(out, "SELECT COUNT(*) FROM messages") == [(600,)], 30,
               "600 rows")
    finally:
        done.set()
        t.join(30)
        pub.close()
        c.stop()
    ids = [r[0] for r in _sqlite(out, "SELECT id FROM messages")]
    assert len(ids) == len(set(ids)) == 600
    assert _sqlite(out, "SELECT COUNT(*) FROM cloud_pending") == [(0,)]
    bad = _sqlite(out, "SELECT kind, detail FROM cloud_reports")
    assert not [r for r in bad if r[0] in BAD_KINDS], bad
    assert c.kills == 5


def test_postgres_sink_idempotent_with_verdicts_and_an_audit_chain(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker], pg_dsn: str,  # noqa: F811
) -> None:
    """Rows keyed by message id (a second pass over the same stream adds none), verdict and
    proof in each row, a tampered message reported and not written, the batches stored so
    that ``audit verify --db`` passes; a batch edited in the database breaks it."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    stream = _stream(keys, "gw-p", 60, 20)
    topic, env, mid = stream[5]
    tampered = (topic, env[:-1] + bytes([env[-1] ^ 1]), mid)
    c = Consumer(tmp_path, broker.port, keys, pg_dsn, "pg1").start()
    pub = Publisher(broker.port)
    try:
        pub.send([*stream[:5], tampered, *stream[5:]])
        pub.wait_acked()
        pub.send(stream)  # everything again: a gateway's retry after a lost PUBACK
        pub.wait_acked()

        def count() -> int:
            return int(asyncio.run(pg_rows(pg_dsn, "SELECT COUNT(*) FROM messages"))[0][0])

        _until(lambda: count() == 60, 20, "60 rows")
        time.sleep(1.5)  # past --grace: anything extra would have been written by now
    finally:
        pub.close()
        c.stop()
    rows = asyncio.run(pg_rows(pg_dsn, "SELECT id, payload, verdict, proof, encrypted "
                                       "FROM messages"))
    assert len(rows) == 60
    assert {bytes(r["payload"]) for r in rows} == {f"gw-p-{i}".encode() for i in range(60)}
    assert {(r["verdict"], r["proof"], r["encrypted"]) for r in rows} == {
        ("verified", "leaf", True)}
    reports = asyncio.run(pg_rows(pg_dsn, "SELECT kind, message_id FROM cloud_reports"))
    assert [(r["kind"], r["message_id"]) for r in reports] == [("tampered", mid)]
    assert asyncio.run(pg_rows(pg_dsn, "SELECT COUNT(*) FROM cloud_pending"))[0][0] == 0

    def audit() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rapidmq_edge", "audit", "verify", "--db", pg_dsn,
             "--gateway-id", "gw-p", "--public-key", str(keys.trust)],
            capture_output=True, text=True, timeout=30)

    res = audit()
    assert res.returncode == 0 and "ok: 3 batches, 60 messages" in res.stdout, res
    asyncio.run(pg_rows(pg_dsn, "UPDATE cloud_control SET payload = overlay(payload placing "
                                "'\\x00'::bytea from 200 for 1) WHERE kind = 'batch' "
                                "AND seq = 1 RETURNING pos"))
    res = audit()
    assert res.returncode == 1 and "BROKEN at batch #1" in res.stdout, res
    assert json.loads(json.dumps(c.report_kinds())) == ["tampered"]


def test_a_consumer_that_never_returns_has_its_waiting_messages_adopted(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
) -> None:
    """c1 acknowledged 20 messages that wait for their batch, then died for good (SIGKILL).
    c2, started later on the same state (it never received them), gets the batch header and,
    once c1 has been silent for ``--lease``, adopts c1's waiting messages and verifies them."""
    broker = mosquitto_factory(BROKER_CONF)
    keys = cloud_keys(tmp_path)
    out = tmp_path / "out.sqlite"
    c1 = Consumer(tmp_path, broker.port, keys, str(out), "c1", "--lease", "2").start()
    c2 = Consumer(tmp_path, broker.port, keys, str(out), "c2", "--lease", "2")
    pub = Publisher(broker.port)
    try:
        stream = _stream(keys, "gw-l", 20, 20)
        pub.send(stream[:-1])
        pub.wait_acked()
        _until(lambda: len(_sqlite(out, "SELECT id FROM cloud_pending WHERE consumer = 'c1'"))
               == 20, 15, "20 waiting at c1")
        c1.kill9()
        c2.start()
        pub.send(stream[-1:])
        pub.wait_acked()
        _until(lambda: _sqlite(out, "SELECT COUNT(*) FROM messages") == [(20,)], 20,
               "20 rows through adoption")
    finally:
        pub.close()
        c2.stop()
    assert _sqlite(out, "SELECT COUNT(*) FROM cloud_pending") == [(0,)]
    assert _sqlite(out, "SELECT consumer FROM cloud_consumers") == [("c2",)]
    assert "adopted 20 waiting messages" in c2.log.read_text()
