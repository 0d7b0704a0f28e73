"""Retention (issue 18 part 3): ``[[retention]]`` rules bound how long any message on a
matching topic is kept — queued for an upstream, retained, or waiting in a session.

The tap runs first on every accepted message and lowers its expiry to ``now +
retention_s`` (the smallest of the matching rules); the stores already drop expired
messages on their own paths (the forward queue counts them as ``ttl_expired``, a session
never sends one), so the write path does no extra work. A sweep every ``interval`` seconds
removes expired retained messages (memory and ``broker.db``) and expired messages queued
in sessions, counting them in :attr:`Retention.drops` by reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from ..broker.broker import Broker
from ..broker.message import Message
from ..config.retention import RetentionRule
from ..mqtt.topics import topic_matches

__all__ = ["Retention"]

log = logging.getLogger(__name__)

_CACHE_SIZE = 10_000


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
        """The tap: bound the message's expiry."""
        if msg.topic.startswith("$"):
            return
        seconds = self.limit(msg.topic)
        if seconds is None:
            return
        deadline = self.clock() + seconds
        if msg.expires_at is None or msg.expires_at > deadline:
            msg.expires_at = deadline
            self.limited += 1

    def sweep(self, broker: Broker) -> int:
        """Remove expired retained and session-queued messages; how many."""
        now = self.clock()
        gone = [t for t, m in broker.retained.items() if m.expired(now)]
        for topic in gone:
            del broker.retained[topic]
            if broker.store is not None:
                broker.store.delete_retained(topic)
        queued = sum(s.drop_expired(now) for s in list(broker.sessions.values()))
        self.drops["retained_expired"] += len(gone)
        self.drops["session_expired"] += queued
        return len(gone) + queued

    async def run(self, broker: Broker, interval: float = 1.0) -> None:
        """Sweep every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            n = self.sweep(broker)
            if n:
                log.debug("retention: %d expired messages removed", n)
