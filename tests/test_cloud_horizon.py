"""A restarted consumer reloads the stored session headers with a horizon (issue 16): the ones
stored within ``--horizon``, each gateway's newest one, and older ones only where a waiting
message of this consumer is sealed in them; everything else stays on disk (audit), unloaded."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from rapidmq_edge.cloud.ingest import restore_into
from rapidmq_edge.cloud.pgstore import PgStore
from rapidmq_edge.cloud.state import SqliteStore, Step
from rapidmq_edge.cloud.verify import Ingest, sid_of_header, sid_of_message
from rapidmq_edge.crypto.envelope import Sealer
from rapidmq_edge.crypto.keys import (
    GatewayIdentity,
    RecipientKey,
    RecipientKeyring,
    VerifierKeyring,
)
from rapidmq_edge.crypto.signed_session import sign_session

from .cloud_helpers import pg_dsn, pg_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(60)

GW, GW2 = "gw-h1", "gw-h2"
DAY = 86400.0


async def _age(store: Any, payloads: list[bytes]) -> None:
    """Make these control rows two days old."""
    if isinstance(store, SqliteStore):
        for p in payloads:
            store.db.execute("UPDATE cloud_control SET received = received - ? "
                             "WHERE payload = ?", (2 * DAY, p))
    else:
        await store.conn.execute("UPDATE cloud_control SET received = received - "
                                 "interval '2 days' WHERE payload = ANY($1::bytea[])", payloads)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_restore_loads_recent_newest_and_needed_sessions_only(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rec, ident = RecipientKey.generate(), GatewayIdentity.generate()
    # four sessions: GW's s0, s1 and its newest s2, two days old; GW2's s3, recent
    sealers = [Sealer(rec.public(), gw) for gw in (GW, GW, GW, GW2)]
    headers = [sign_session(s.session_header, ident) for s in sealers]
    sids = [sid_of_header(h) for h in headers]
    assert None not in sids and len(set(sids)) == 4
    waiting = sealers[1].seal(b"late", topic=f"edge/{GW}/t", message_id=f"{GW}:7").envelope
    assert sid_of_message(waiting) == sids[1]
    dsn = request.getfixturevalue("pg_dsn") if kind == "postgresql" else ""

    async def main() -> None:
        store: Any
        if kind == "sqlite":
            store = SqliteStore(tmp_path / "state.sqlite")
        else:
            store = await PgStore.connect(dsn)
        try:
            for h, gw in zip(headers, (GW, GW, GW, GW2), strict=True):
                await store.commit("c1", Step(control=[("session", h, gw, None)]))
            await store.commit("c1", Step(stage=[(f"{GW}:7", f"edge/{GW}/t", waiting)]))
            await _age(store, headers[:3])

            def fresh() -> Ingest:
                return Ingest(VerifierKeyring([ident.public()]), RecipientKeyring([rec]))

            ing = fresh()  # c1 has a message waiting in the superseded session s1
            restored = await restore_into(store, ing, "c1", 3600, page=1)
            known = [ing.opener.knows(s) for s in sids]  # type: ignore[arg-type]
            assert known == [False, True, True, True], known
            assert ing.counts["sessions"] == 3 and len(restored.pending) == 1
            assert ing.take_control() == []  # loaded, not to be stored again

            ing = fresh()  # c2 waits for nothing: the recent one and GW's newest
            await restore_into(store, ing, "c2", 3600)
            assert [ing.opener.knows(s) for s in sids] == [False, False, True, True]  # type: ignore[arg-type]
            ing = fresh()  # a horizon reaching back: all of them
            await restore_into(store, ing, "c2", 3 * DAY)
            assert all(ing.opener.knows(s) for s in sids)  # type: ignore[arg-type]
        finally:
            await store.close()

    asyncio.run(main())
