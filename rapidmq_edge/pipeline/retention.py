"""Retention (issue 18 part 3): ``[[retention]]`` rules bound how long any message on a
matching topic is kept — queued for an upstream, retained, or waiting in a session.

The tap runs first on every accepted message and lowers its expiry to ``now +
retention_s`` (the smallest of the matching rules); the stores already drop expired
messages on their own paths (the forward queue counts them as ``ttl_expired``, a session
never sends one). The tap also files every message that expires in an expiry index, a
wheel of whole seconds: the second it expires in (a heap of such seconds) and, for a
retained message, the message in that second's slot. A sweep every ``interval`` seconds
then costs what expired, not what is kept: only when a second has passed does it empty
that slot (the retained messages removed from memory and ``broker.db``; an entry whose
topic has been retained again since is stale and skipped) and visit the sessions holding
queued messages to drop the expired ones. Removals are counted in :attr:`Retention.drops`
by reason. Messages restored at start-up are filed when the sweeping starts (``run``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Sequence

from ..broker.broker import Broker
from ..broker.message import Message
from ..config.retention import RetentionRule
from ..mqtt.topics import topic_matches

heappush = heapq.heappush

__all__ = ["Retention"]

log = logging.getLogger(__name__)

_CACHE_SIZE = 10_000
#: the wheel's stale entries (topics retained again, or cleared, before their expiry) are
#: dropped once its entries outnumber the live retained messages by this factor
_COMPACT_FACTOR = 2
_COMPACT_MIN = 1024


class Retention:
    """The retention rules as a tap and a sweep."""

    def __init__(self, rules: Sequence[RetentionRule], mountpoint: str = "tenants/${tenant}/",
                 clock: Callable[[], float] = time.time) -> None:
        self.rules = tuple(
            ((mountpoint.replace("${tenant}", r.tenant) if r.tenant else "") + r.filter,
             r.retention_s) for r in rules)
        self.clock = clock
        self._limits: dict[str, float | None] = {}
        #: messages whose expiry the rules shortened
        self.limited = 0
        #: what the sweep removed, by reason
        self.drops = {"retained_expired": 0, "session_expired": 0}
        #: the expiry index, a wheel of whole seconds: second -> the retained messages that
        #: expire before it (stale ones, retained again since, stay until their second);
        #: every second some message expires in (a session may hold it) is in ``_due``
        self._wheel: dict[int, list[Message]] = {}
        self._filed_retained = 0  # messages in the wheel
        self._due: list[int] = []  # heap of the wheel's seconds and the others
        self._due_set: set[int] = set()
        self._last_second = 0
        self._filed = False  # the messages restored at start-up are filed

    def limit(self, topic: str) -> float | None:
        """The retention (s) for ``topic``: the smallest of the matching rules, or None."""
        hit = self._limits.get(topic, -1.0)
        if hit != -1.0:
            return hit
        found = [s for f, s in self.rules if topic_matches(f, topic)]
        value = min(found) if found else None
        if len(self._limits) >= _CACHE_SIZE:
            del self._limits[next(iter(self._limits))]
        self._limits[topic] = value
        return value

    def __call__(self, msg: Message) -> None:
        """The tap: bound the message's expiry, file it in the expiry index."""
        topic = msg.topic
        if topic.startswith("$"):
            return
        expires = msg.expires_at
        seconds = self._limits.get(topic, -1.0)
        if seconds == -1.0:
            seconds = self.limit(topic)
        if seconds is not None:
            deadline = self.clock() + seconds
            if expires is None or expires > deadline:
                msg.expires_at = expires = deadline
                self.limited += 1
        if expires is None:
            return
        second = int(expires) + 1  # (a message expiring on a whole second: swept 1 s late)
        if second != self._last_second:  # most messages: the second of the one before
            self._last_second = second
            self._file_second(second)
        if msg.retain and msg.payload:
            self._file_retained(second, msg)

    def _file_retained(self, second: int, msg: Message) -> None:
        slot = self._wheel.get(second)
        if slot is None:
            self._wheel[second] = [msg]
        else:
            slot.append(msg)
        self._filed_retained += 1

    def _file_second(self, second: int) -> None:
        if second not in self._due_set:
            self._due_set.add(second)
            heappush(self._due, second)

    def _file_restored(self, broker: Broker) -> None:
        """File what was restored at start-up (once: a walk of everything; call before
        messages are published, or they are filed twice: harmless, a stale entry)."""
        self._filed = True
        for m in broker.retained.values():
            if m.expires_at is not None:
                second = int(m.expires_at) + 1
                self._file_second(second)
                self._file_retained(second, m)
        for s in broker.sessions.values():
            for d in s.queue:
                if d.message.expires_at is not None:
                    self._file_second(int(d.message.expires_at) + 1)

    def sweep(self, broker: Broker) -> int:
        """Remove expired retained and session-queued messages; how many."""
        if not self._filed:
            self._file_restored(broker)
        now = self.clock()
        due = self._due
        gone = queued = 0
        if due and due[0] <= now:
            retained, store = broker.retained, broker.store
            while due and due[0] <= now:
                second = heapq.heappop(due)
                self._due_set.discard(second)
                slot = self._wheel.pop(second, None)
                if slot is None:
                    continue
                self._filed_retained -= len(slot)
                for msg in slot:
                    held = retained.get(msg.topic)
                    if held is msg:
                        del retained[msg.topic]
                        gone += 1
                    elif held is not None:
                        continue  # retained again since: that message is filed itself
                    if store is not None:  # (not held: served expired once, then dropped
                        store.delete_retained(msg.topic)  # from memory by the broker)
            self._last_second = 0
            queued = sum(s.drop_expired(now) for s in list(broker.sessions.values())
                         if s.queue)
        if self._filed_retained > _COMPACT_FACTOR * len(broker.retained) + _COMPACT_MIN:
            self.compact(broker.retained)
        self.drops["retained_expired"] += gone
        self.drops["session_expired"] += queued
        return gone + queued

    def compact(self, retained: dict[str, Message]) -> None:
        """Drop the index's stale entries (a topic retained over and over before it
        expires; messages an erasure removed): those not in ``retained`` any more."""
        for second, slot in list(self._wheel.items()):
            live = [m for m in slot if retained.get(m.topic) is m]
            self._filed_retained -= len(slot) - len(live)
            if live:
                self._wheel[second] = live
            else:
                del self._wheel[second]

    async def run(self, broker: Broker, interval: float = 1.0) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        if not self._filed:
            self._file_restored(broker)
        while True:
            await asyncio.sleep(interval)
            n = self.sweep(broker)
            if n:
                log.debug("retention: %d expired messages removed", n)
