"""The forward queue's in-memory index: one :class:`Lane` per upstream and priority class.

Ready ids are kept sorted in compact arrays (a head offset ``h`` instead of popping from
the front); in-flight ids (handed out, not yet acknowledged) in a dict. Pure data
structure: no SQLite, no asyncio.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right

__all__ = ["Entry", "Lane"]

Entry = tuple[int, float, float]  # size, created, expires_at (0.0 = never)


class Lane:
    """Messages of one upstream and class: ready ids (sorted, compact arrays from ``h``)
    plus the in-flight ones (handed out, not yet acked)."""

    __slots__ = ("ids", "sizes", "created", "expires", "h", "msgs", "bytes", "inflight")

    def __init__(self) -> None:
        self.ids = array("q")
        self.sizes = array("q")
        self.created = array("d")
        self.expires = array("d")
        self.h = 0
        self.msgs = 0  # ready + in flight (+ not yet committed)
        self.bytes = 0
        self.inflight: dict[int, Entry] = {}

    def append(self, mid: int, size: int, created: float, expires: float) -> None:
        self.ids.append(mid)
        self.sizes.append(size)
        self.created.append(created)
        self.expires.append(expires)
        self.msgs += 1
        self.bytes += size

    @property
    def ready(self) -> int:
        return len(self.ids) - self.h

    def entry(self, i: int) -> tuple[int, Entry]:
        return self.ids[i], (self.sizes[i], self.created[i], self.expires[i])

    def cut(self, i: int, j: int) -> None:
        """Remove positions ``i:j`` (i >= h) from the ready arrays."""
        if i == self.h:
            self.h = j
            if self.h > 4096 and self.h * 2 > len(self.ids):
                for a in (self.ids, self.sizes, self.created, self.expires):
                    del a[: self.h]
                self.h = 0
        else:
            for a in (self.ids, self.sizes, self.created, self.expires):
                del a[i:j]

    def remove_range(self, lo: int, hi: int) -> list[int]:
        """Drop ready ids in ``[lo, hi]``; return them (counters adjusted)."""
        i = bisect_left(self.ids, lo, self.h)
        j = bisect_right(self.ids, hi, i)
        gone = list(self.ids[i:j])
        self.msgs -= len(gone)
        self.bytes -= sum(self.sizes[i:j])
        if gone:
            self.cut(i, j)
        return gone

    def merge(self, items: list[tuple[int, Entry]]) -> None:
        """Put ids back into the ready arrays in order (used by requeue)."""
        items.sort()
        i = bisect_left(self.ids, items[0][0], self.h)
        j = bisect_right(self.ids, items[-1][0], i)
        old = [self.entry(k) for k in range(i, j)]
        merged = sorted(old + items)
        if i == self.h and j == i and self.h >= len(merged):
            self.h -= len(merged)  # room before the head: write in place
            i = j = self.h
            for k, (mid, (size, created, expires)) in enumerate(merged):
                self.ids[i + k] = mid
                self.sizes[i + k] = size
                self.created[i + k] = created
                self.expires[i + k] = expires
            return
        self.ids[i:j] = array("q", [m for m, _ in merged])
        self.sizes[i:j] = array("q", [e[0] for _, e in merged])
        self.created[i:j] = array("d", [e[1] for _, e in merged])
        self.expires[i:j] = array("d", [e[2] for _, e in merged])

    def oldest_created(self) -> float | None:
        times = [e[1] for e in self.inflight.values()]
        if self.ready:
            times.append(self.created[self.h])
        return min(times) if times else None

    def oldest_id(self) -> int:
        """The smallest id still queued (ready or in flight); the lane must not be empty."""
        ids = [*self.inflight]
        if self.ready:
            ids.append(self.ids[self.h])
        return min(ids)
