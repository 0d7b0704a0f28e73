"""Bounds of the forward queue: per-class limits and what happens when one is reached.

Each priority class has its own :class:`ClassLimits` per upstream (messages, bytes, age);
a ``drop_oldest`` class makes room by dropping its oldest messages, a ``refuse_new`` class
refuses the put with :class:`QueueFull`. The queue-wide ``max_bytes`` evicts from
``drop_oldest`` classes not above the new message's priority, least important first.

:class:`QueueBounds` is mixed into :class:`~.forward_queue.ForwardQueue`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .errors import QueueFull
from .lanes import Lane

__all__ = ["DEFAULT_CLASSES", "ClassLimits", "Policy", "QueueBounds"]

Policy = Literal["drop_oldest", "refuse_new"]


@dataclass(frozen=True, slots=True)
class ClassLimits:
    """Bounds of one priority class, per upstream (0 = unlimited).

    ``max_age`` (s): a ``drop_oldest`` class drops messages older than this; a
    ``refuse_new`` class refuses new ones while its oldest unacked message is older.
    """

    max_messages: int = 0
    max_bytes: int = 0
    max_age: float = 0
    policy: Policy = "drop_oldest"


DEFAULT_CLASSES: dict[int, ClassLimits] = {
    0: ClassLimits(policy="refuse_new"), 1: ClassLimits(), 2: ClassLimits(), 3: ClassLimits(),
}


class QueueBounds:
    """Limit checks and evictions (mixed into ``ForwardQueue``, whose ``__init__`` sets the
    attributes declared here)."""

    classes: dict[int, ClassLimits]
    max_bytes: int
    drops: dict[str, int]
    _lanes: dict[tuple[str, int], Lane]
    _total_bytes: int

    if TYPE_CHECKING:  # provided by ForwardQueue
        def _forget(self, mid: int, size: int, reason: str, prio: int = -1,
                    kind: str | None = None) -> None: ...

        def _count_drop(self, reason: str, prio: int, kind: str | None = None) -> None: ...

    def _refuse(self, reason: str, prio: int = -1, kind: str = "queue_full") -> QueueFull:
        self._count_drop("refused", prio, kind)
        return QueueFull(reason)

    def _check_class(
        self, up: str, prio: int, lane: Lane, lim: ClassLimits, size: int, now: float,
    ) -> None:
        if lim.max_bytes and size > lim.max_bytes:
            raise self._refuse(f"message of {size} B exceeds class {prio} max_bytes", prio,
                               "too_large")
        if self.max_bytes and size > self.max_bytes:
            raise self._refuse(f"message of {size} B exceeds queue max_bytes", prio,
                               "too_large")
        if lim.policy == "drop_oldest":
            if lim.max_age:
                self._trim_age(up, prio, lane, now - lim.max_age)
            while lane.msgs and (
                (lim.max_messages and lane.msgs + 1 > lim.max_messages)
                or (lim.max_bytes and lane.bytes + size > lim.max_bytes)
            ):
                self._evict_oldest(up, prio, lane)
            return
        if lim.max_messages and lane.msgs >= lim.max_messages:
            raise self._refuse(f"{up}: class {prio} holds max_messages={lim.max_messages}",
                               prio)
        if lim.max_bytes and lane.bytes + size > lim.max_bytes:
            raise self._refuse(f"{up}: class {prio} holds max_bytes={lim.max_bytes}", prio)
        if lim.max_age:
            oldest = lane.oldest_created()
            if oldest is not None and now - oldest > lim.max_age:
                raise self._refuse(f"{up}: class {prio} has messages older than max_age",
                                   prio, "expired_by_age")

    def _make_room(self, priority: int, size: int) -> None:
        """Evict oldest messages of drop_oldest classes not above ``priority`` (least
        important class first) until ``size`` more bytes fit, or refuse."""
        need = self._total_bytes + size - self.max_bytes
        evictable = [
            (p, key, lane) for key, lane in self._lanes.items()
            if (p := key[1]) >= priority and self.classes[p].policy == "drop_oldest"
        ]
        if sum(lane.bytes for _, _, lane in evictable) < need:
            raise self._refuse(f"queue holds max_bytes={self.max_bytes}", priority)
        for p in sorted({p for p, _, _ in evictable}, reverse=True):
            lanes = [(key, lane) for q, key, lane in evictable if q == p]
            while self._total_bytes + size > self.max_bytes:
                live = [(key, lane) for key, lane in lanes if lane.msgs]
                if not live:
                    break
                key, lane = min(live, key=lambda kl: kl[1].oldest_id())
                self._evict_oldest(key[0], key[1], lane)
            if self._total_bytes + size <= self.max_bytes:
                return

    def _evict_oldest(self, up: str, prio: int, lane: Lane) -> None:
        if lane.inflight and (not lane.ready or min(lane.inflight) < lane.ids[lane.h]):
            mid = min(lane.inflight)
            size = lane.inflight.pop(mid)[0]
        else:
            mid, size = lane.ids[lane.h], lane.sizes[lane.h]
            lane.cut(lane.h, lane.h + 1)
        lane.msgs -= 1
        lane.bytes -= size
        self._forget(mid, size, "dropped_oldest", prio)

    def _trim_age(self, up: str, prio: int, lane: Lane, cutoff: float) -> None:
        """Drop ready (not in-flight) messages created before ``cutoff``."""
        while lane.ready and lane.created[lane.h] < cutoff:
            mid, size = lane.ids[lane.h], lane.sizes[lane.h]
            lane.cut(lane.h, lane.h + 1)
            lane.msgs -= 1
            lane.bytes -= size
            self._forget(mid, size, "dropped_oldest", prio, "expired_by_age")
