"""The batch chain seen through a shared state (issue 16, the chaos flake "batches 21..21 never
arrived"): a partition consumer does not judge the chains of gateways it does not handle, and
headers committed by consumers out of ``pos`` order are not skipped by the readers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from rapidmq_edge.cloud.pgstore import PgStore
from rapidmq_edge.cloud.state import digest
from rapidmq_edge.cloud.verify import Ingest
from rapidmq_edge.crypto.batch import BatchBuilder
from rapidmq_edge.crypto.batch_message import encode_batch_message
from rapidmq_edge.crypto.keys import GatewayIdentity, RecipientKeyring, VerifierKeyring

from .cloud_helpers import pg_dsn, pg_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)

GW = "gw-shared"


def _batches(n: int) -> tuple[list[bytes], VerifierKeyring]:
    """``n`` consecutive signed batch messages of one gateway (2 messages each)."""
    ident = GatewayIdentity.generate()
    builder = BatchBuilder(ident, GW)
    out = []
    for b in range(n):
        qids = [10 * b + 1, 10 * b + 2]
        for q in qids:
            builder.add(f"{GW}:{q}", f"edge/{GW}/t", b"x%d" % q)
        batch = builder.seal()
        assert batch is not None
        out.append(encode_batch_message(batch, qids, True))
    return out, VerifierKeyring([ident.public()])


@pytest.mark.parametrize("owned", [True, False])
def test_a_partition_consumer_does_not_judge_another_partitions_chain(owned: bool) -> None:
    """The non-owner of a gateway reads its batches from the shared state (the owner stores
    them as it receives them). A batch the owner receives late — class 0 drains newest first
    after an outage; an owner killed before its commit gets it again after its restart — is a
    gap in the non-owner's view for that long: it was reported "batches 1..1 never arrived".
    Only the owner, which receives the gateway's data, judges its chain."""
    batches, ids = _batches(3)
    now = [0.0]
    ing = Ingest(ids, RecipientKeyring([]), grace=1.0, chain_start=0, clock=lambda: now[0],
                 owns=(lambda gw: gw == GW) if owned else (lambda gw: False))
    ing.add_control("batch", batches[0])
    ing.add_control("batch", batches[2])  # batch 1: still with the owner
    now[0] = 30.0
    _, reports = ing.poll()
    if owned:  # its own chain: a gap is a gap
        assert ("missing-batch", "batches 1..1 never arrived") in [
            (r.kind, r.detail) for r in reports]
    else:
        assert reports == [] and ing.gateways == {} and ing.take_control() == []


def _insert(conn: Any, payload: bytes, seq: int) -> Any:
    return conn.execute(
        "INSERT INTO cloud_control (digest, kind, gateway, seq, payload) "
        "VALUES ($1, 'batch', $2, $3, $4)", digest(payload), GW, seq, payload)


def test_headers_committed_out_of_pos_order_are_not_skipped(pg_dsn: str) -> None:  # noqa: F811
    """Two consumers store headers at once: A takes pos 1 and commits after B committed pos 2.
    A reader that had moved its cursor past 2 used to never see 1 (``pos > cursor``): the
    batch's messages then waited for it until --batch-timeout and were reported missing."""
    import asyncpg

    async def main() -> None:
        reader = await PgStore.connect(pg_dsn)
        a = await asyncpg.connect(pg_dsn)
        b = await asyncpg.connect(pg_dsn)
        try:
            restored = await reader.restore("reader", 3600)
            cursor = restored.cursor
            tx = a.transaction()
            await tx.start()
            await _insert(a, b"header-from-A", 1)  # pos taken, not committed
            await _insert(b, b"header-from-B", 2)  # autocommit: visible first
            rows, cursor = await reader.control_since(cursor)
            assert rows == [("batch", b"header-from-B")]
            await tx.commit()
            rows, cursor = await reader.control_since(cursor)
            assert rows == [("batch", b"header-from-A")]
            rows, cursor = await reader.control_since(cursor)
            assert rows == []  # each once
            # a restart in the middle: the open transaction's pos is a gap from the start
            again = await PgStore.connect(pg_dsn)  # (creating the tables waits for open ones)
            tx = a.transaction()
            await tx.start()
            await _insert(a, b"late", 3)
            await _insert(b, b"early", 4)
            try:
                restored = await again.restore("reader2", 3600)
                assert (b"early" in [p for _, p in restored.control]
                        and b"late" not in [p for _, p in restored.control])
                await tx.commit()
                rows, _ = await again.control_since(restored.cursor)
                assert rows == [("batch", b"late")]
            finally:
                await again.close()
        finally:
            await a.close()
            await b.close()
            await reader.close()

    asyncio.run(main())
