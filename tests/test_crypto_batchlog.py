"""The SQLite batch chain: durable pending leaves, resume after restart, kill -9 mid-write."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rapidmq_edge.crypto.batch import verify_chain
from rapidmq_edge.crypto.batchlog import BatchLog, read_chain
from rapidmq_edge.crypto.errors import BatchError
from rapidmq_edge.crypto.keys import GatewayIdentity, VerifierKeyring

GW = "gw-1"
SEED = bytes(range(32))
IDENT = GatewayIdentity(SEED)
RING = VerifierKeyring([IDENT.public()])


def test_batches_seal_by_size_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    with BatchLog(path, IDENT, GW, batch_size=4) as log:
        sealed = log.add_many([(f"{GW}:{i}", "t", b"%d" % i) for i in range(10)])
        assert [b.header.seq for b in sealed] == [0, 1] and log.pending == 2
    with BatchLog(path, IDENT, GW, batch_size=4) as log:  # pending leaves come back
        assert log.pending == 2 and log.next_seq == 2
        b = log.seal()
        assert b is not None and b.header.count == 2 and b.header.first_id == f"{GW}:8"
        assert log.add(f"{GW}:10", "t", b"x") is None
    report = verify_chain(read_chain(path), RING)
    assert report.ok and report.batches == 3 and report.messages == 10


def test_seal_due_by_time(tmp_path: Path) -> None:
    now = [100.0]
    with BatchLog(tmp_path / "c.sqlite", IDENT, GW, batch_size=100, clock=lambda: now[0]) as log:
        assert log.seal_due(5.0) is None
        log.add("a", "t", b"x")
        now[0] += 4.9
        assert log.seal_due(5.0) is None
        now[0] += 0.1
        b = log.seal_due(5.0)
        assert b is not None and b.header.time_ms == 105_000


def test_other_gateway_refused(tmp_path: Path) -> None:
    BatchLog(tmp_path / "c.sqlite", IDENT, GW).close()
    with pytest.raises(BatchError, match="gw-1"):
        BatchLog(tmp_path / "c.sqlite", IDENT, "gw-2")


def test_tampering_in_the_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with BatchLog(path, IDENT, GW, batch_size=2) as log:
        log.add_many([(str(i), "t", b"x") for i in range(10)])
    db = sqlite3.connect(path)
    db.execute("DELETE FROM batches WHERE pos = 2")
    db.commit()
    db.close()
    r = verify_chain(read_chain(path), RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (3, "missing-batch")


WRITER = """
import sys
from pathlib import Path
from rapidmq_edge.crypto.batchlog import BatchLog
from rapidmq_edge.crypto.keys import GatewayIdentity
log = BatchLog(Path(sys.argv[1]), GatewayIdentity(bytes(range(32))), "gw-1", batch_size=5)
i = log.next_seq * 5 + log.pending
while True:
    log.add(f"gw-1:{i}", "t", b"payload %d" % i)
    print(i, flush=True)
    i += 1
"""


def test_kill_9_mid_batch_leaves_a_verifiable_chain(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    acked = -1
    for _round in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            deadline = time.monotonic() + 20
            target = acked + 40 + 7 * _round  # kill at varying points inside a batch
            assert proc.stdout is not None
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                acked = int(line)
                if acked >= target:
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            for line in proc.stdout:  # lines printed before the kill landed
                acked = int(line)
        finally:
            proc.kill()
            proc.wait(timeout=10)
        assert acked >= target
        report = verify_chain(read_chain(path), RING)
        assert report.ok, report.broken
        # every acknowledged message is either in a committed batch or pending: none lost
        with BatchLog(path, IDENT, GW, batch_size=5) as log:
            assert report.messages + log.pending >= acked + 1
            assert report.messages + log.pending <= acked + 2
            acked = report.messages + log.pending - 1
    with BatchLog(path, IDENT, GW, batch_size=5) as log:
        log.seal()
    final = verify_chain(read_chain(path), RING)
    assert final.ok and final.messages == acked + 1
