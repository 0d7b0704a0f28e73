"""Message deduplication (RFC 7252 §4.5): one entry per (remote, message id), sans-I/O.

A request seen for the first time gets an entry marked *pending*; when its response is
ready the entry keeps the serialized response, so a retransmission of the request is
answered with the same bytes instead of being processed (published) again. Entries live
``lifetime`` seconds (EXCHANGE_LIFETIME, 247 s, for CON; NON_LIFETIME, 145 s, is shorter, the
longer one is used for both) and at most ``max_entries`` exist at once: past that the
oldest are forgotten early, which is the only way a duplicate could then be processed
twice (at 5,000 requests/s the default keeps 20 s, several retransmission timeouts).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Final

#: EXCHANGE_LIFETIME (RFC 7252 §4.8.2) with the default transmission parameters
EXCHANGE_LIFETIME: Final = 247.0
#: stands for "seen, response not ready yet": a retransmission is then ignored
PENDING: Final = b""


class Deduplicator:
    """Responses by (remote, message id), oldest first."""

    def __init__(self, max_entries: int = 100_000, lifetime: float = EXCHANGE_LIFETIME) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.lifetime = lifetime
        # insertion-ordered: (remote, mid) -> [expiry time, response bytes or PENDING]
        self._entries: OrderedDict[tuple[Hashable, int], list[float | bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, remote: Hashable, mid: int, now: float) -> bytes | None:
        """None for a new message (now recorded as pending); else the cached response,
        or :data:`PENDING` while the first copy is still being processed."""
        key = (remote, mid)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] > now:  # type: ignore[operator]
                return entry[1]  # type: ignore[return-value]
            del self._entries[key]  # expired: a new message reusing the id
        self._entries[key] = [now + self.lifetime, PENDING]
        if len(self._entries) > self.max_entries:
            self.expire(now, force=len(self._entries) - self.max_entries)
        return None

    def answer(self, remote: Hashable, mid: int, response: bytes) -> None:
        """Keep ``response`` for retransmissions of (remote, mid)."""
        entry = self._entries.get((remote, mid))
        if entry is not None:
            entry[1] = response

    def forget(self, remote: Hashable, mid: int) -> None:
        """Drop an entry (a request that must be processed again when repeated)."""
        self._entries.pop((remote, mid), None)

    def expire(self, now: float, force: int = 0) -> int:
        """Remove expired entries (and ``force`` more of the oldest); return how many."""
        entries = self._entries
        removed = 0
        while entries:  # oldest first: stop at the first live one
            key = next(iter(entries))
            if removed >= force and entries[key][0] > now:  # type: ignore[operator]
                break
            del entries[key]
            removed += 1
        return removed
