"""The audit chain the cloud consumers stored (``audit verify --db``): batch messages of one
gateway from PostgreSQL or a cloud SQLite file, in seq order."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from ..crypto.batch import GENESIS_ROOT, ChainEntry, parse_signed_header
from .state import read_chain_rows

__all__ = ["stored_chain"]


def stored_chain(db: str, gateway_id: str) -> tuple[list[ChainEntry], int, bytes]:
    """(entries, first seq, its prev_root): the stored chain may start after seq 0 (a consumer
    that started late); the signatures then vouch for the start point."""
    if db.startswith(("postgresql://", "postgres://")):
        from .pgstore import read_chain_pg

        entries = asyncio.run(read_chain_pg(db, gateway_id))
    else:
        if not Path(db).exists():
            raise FileNotFoundError(f"no cloud database at {db}")
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            entries = read_chain_rows(conn.execute(
                "SELECT seq, payload FROM cloud_control WHERE kind = 'batch' AND gateway = ? "
                "ORDER BY seq", (gateway_id,)))
        finally:
            conn.close()
    if not entries:
        return entries, 0, GENESIS_ROOT
    head = parse_signed_header(entries[0].signed)[0]
    return entries, head.seq, head.prev_root
