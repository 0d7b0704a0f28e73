"""Anti-rollback: the accepted manifest sequence number per component, in SQLite.

``<data_dir>/ota/ota.sqlite`` (WAL, ``synchronous=FULL``), table ``ota_accepted``: one row per
component with its highest accepted sequence and the SHA-256 of that manifest. Each accept is
one ``BEGIN IMMEDIATE`` transaction that re-checks before it writes, so the stored value only
ever grows: a later rollback of the *running model* to the previous slot never lowers it, and
no API here can (a lower sequence is always ``rollback``).

:func:`decide` is the rule itself (pure); :class:`SequenceStore` persists it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from .manifest import ManifestRefused

__all__ = ["DB_NAME", "SequenceStore", "decide"]

DB_NAME = "ota.sqlite"


def decide(current: tuple[int, bytes] | None, component: str, sequence: int,
           manifest_sha256: bytes) -> str:
    """"new" (higher than ``current`` or nothing accepted yet) or "duplicate" (the accepted
    manifest again); ManifestRefused rollback (lower) or conflict (equal, other manifest)."""
    if current is None or sequence > current[0]:
        return "new"
    if sequence < current[0]:
        raise ManifestRefused("rollback", f"{component} sequence {sequence} is lower than the "
                              f"accepted {current[0]}")
    if manifest_sha256 != current[1]:
        raise ManifestRefused("conflict", f"{component} sequence {sequence} was accepted for "
                              f"another manifest ({current[1].hex()[:16]}...)")
    return "duplicate"


class SequenceStore:
    """The accepted sequences of one gateway (``path``: the SQLite file, created if absent)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS ota_accepted (component TEXT PRIMARY KEY, "
            "sequence INTEGER NOT NULL, manifest_sha256 BLOB NOT NULL, accepted_at REAL NOT NULL)")

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> SequenceStore:
        """The store at ``<data_dir>/ota/ota.sqlite``."""
        return cls(Path(data_dir) / "ota" / DB_NAME)

    def current(self, component: str) -> tuple[int, bytes] | None:
        """``(sequence, manifest sha256)`` accepted for ``component``, or None."""
        row = self._db.execute("SELECT sequence, manifest_sha256 FROM ota_accepted "
                               "WHERE component = ?", (component,)).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]))

    def all(self) -> dict[str, int]:
        """component -> accepted sequence."""
        return {c: int(s) for c, s in self._db.execute(
            "SELECT component, sequence FROM ota_accepted ORDER BY component")}

    def check(self, component: str, sequence: int, manifest_sha256: bytes) -> str:
        """:func:`decide` against what is stored (writes nothing)."""
        return decide(self.current(component), component, sequence, manifest_sha256)

    def accept(self, component: str, sequence: int, manifest_sha256: bytes) -> str:
        """Record ``sequence`` as accepted, durably, in one transaction; returns "new" or
        "duplicate" (nothing written); ManifestRefused rollback/conflict (nothing written)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            verdict = self.check(component, sequence, manifest_sha256)
            if verdict == "new":
                self._db.execute(
                    "INSERT INTO ota_accepted VALUES (?, ?, ?, ?) ON CONFLICT(component) DO "
                    "UPDATE SET sequence = excluded.sequence, manifest_sha256 = "
                    "excluded.manifest_sha256, accepted_at = excluded.accepted_at "
                    "WHERE excluded.sequence > ota_accepted.sequence",
                    (component, sequence, manifest_sha256, time.time()))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back (disk full)
                self._db.execute("ROLLBACK")
            raise
        return verdict

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> SequenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
