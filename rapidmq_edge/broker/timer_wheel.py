"""One event-loop timer for the deadlines of many connections (keep-alive, CONNECT timeout).

A ``call_later`` per client costs a timer handle (~0.6 KB) and a heap entry each; the wheel
keeps each client in a set per tick instead and arms one loop timer for the earliest tick.
A deadline fires at most one ``TICK`` late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol

__all__ = ["TICK", "TimerWheel", "WheelEntry"]

TICK = 0.25  # seconds per slot


class WheelEntry(Protocol):
    """What the wheel calls when an entry's deadline has passed."""

    def wheel_due(self) -> None: ...


class TimerWheel:
    """Deadlines rounded up to ``tick``; entries due in one slot are called together."""

    __slots__ = ("loop", "tick", "_slots", "_keys", "_handle", "_armed")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK) -> None:
        self.loop = loop
        self.tick = tick
        self._slots: dict[int, set[WheelEntry]] = {}
        self._keys: list[int] = []  # heap of the slots' keys
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0  # the slot the loop timer is set for

    def add(self, entry: WheelEntry, delay: float) -> int:
        """Call ``entry.wheel_due()`` once ``delay`` seconds have passed; returns the key
        to :meth:`discard` it with."""
        key = int((self.loop.time() + delay) / self.tick) + 1
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            heapq.heappush(self._keys, key)
            if self._handle is None or key < self._armed:
                self._arm(key)
        slot.add(entry)
        return key

    def discard(self, entry: WheelEntry, key: int) -> None:
        """Forget ``entry``'s deadline in slot ``key`` (no-op when already called)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(entry)

    def __len__(self) -> int:
        return sum(len(s) for s in self._slots.values())

    def _arm(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = key
        self._handle = self.loop.call_at(key * self.tick, self._fire)

    def _fire(self) -> None:
        self._handle = None
        now = int((self.loop.time() + 0.002) / self.tick)  # a loop timer may fire ~1 ms early
        keys, slots = self._keys, self._slots
        while keys and keys[0] <= now:
            slot = slots.pop(heapq.heappop(keys), None)
            for entry in list(slot or ()):
                entry.wheel_due()  # may add it again: always to a later slot
        while keys and not slots.get(keys[0]):  # empty slots (every entry discarded)
            slots.pop(heapq.heappop(keys), None)
        if keys:
            self._arm(keys[0])

