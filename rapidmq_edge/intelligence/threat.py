"""Per-client behaviour watch: feed broker events, score clients, act on abuse.

The broker connection calls the hooks (:meth:`ClientWatch.admit` before authentication,
then ``connected`` / ``published`` / ``subscribed`` / ``closed``); they only count, into
:class:`~.features.ClientWindows`. Every ``interval`` seconds :meth:`ClientWatch.tick`
scores the open window of each client that acted since the last tick (one batch) and, for a
client judged abusive, records why (log, counters) and, with ``action = "disconnect"``,
closes its connection with an MQTT 5 DISCONNECT carrying a reason code and refuses its
client id (CONNACK 0x8A Banned) for ``ban_s`` seconds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..mqtt import reasons as rc
from .features import THREAT_LABELS, ClientWindows
from .models import Scorer

log = logging.getLogger(__name__)

#: DISCONNECT reason code per threat label
REASONS: dict[str, int] = {
    "credential_guessing": rc.NOT_AUTHORIZED,  # 0x87
    "topic_scanning": rc.NOT_AUTHORIZED,  # 0x87
    "flood": rc.MESSAGE_RATE_TOO_HIGH,  # 0x96
}
#: remembered recent verdicts (for $SYS and status)
RECENT = 20


class Link(Protocol):
    """The part of a broker connection the watch acts on."""

    def disconnect(self, reason: int, why: str = "") -> None: ...


@dataclass(slots=True)
class Verdict:
    """One abusive client and what was done."""

    client: str
    label: str
    confidence: float
    action: str
    at: float


class ClientWatch:
    """Client-behaviour detector with its hooks for the broker connection."""

    def __init__(self, scorer: Scorer, action: str = "disconnect", ban_s: float = 60.0,
                 min_events: int = 10, min_confidence: float = 0.7,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scorer = scorer
        self.min_events = min_events
        self.min_confidence = min_confidence
        self.action = action
        self.ban_s = ban_s
        self.clock = clock
        self.windows = ClientWindows()
        self.links: dict[str, Link] = {}
        self.banned: dict[str, tuple[float, str]] = {}
        self._active: set[str] = set()
        self.detected: Counter[str] = Counter()
        self.disconnected = 0
        self.refused = 0
        self.scored = 0
        self.recent: deque[Verdict] = deque(maxlen=RECENT)

    # -- hooks (called by the connection) ------------------------------------------

    def admit(self, client_id: str) -> int:
        """0, or the CONNACK reason code refusing a banned client id."""
        ban = self.banned.get(client_id)
        if ban is None:
            return 0
        if self.clock() >= ban[0]:
            del self.banned[client_id]
            return 0
        self.refused += 1
        self.windows.connect(client_id, self.clock(), False)
        self._active.add(client_id)
        return rc.BANNED

    def connected(self, link: Link, client_id: str, username: str | None, reason: int) -> None:
        """A CONNECT was answered with ``reason`` (0 = accepted)."""
        self.windows.connect(client_id, self.clock(), reason == 0, username)
        self._active.add(client_id)
        if reason == 0:
            self.links[client_id] = link

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None:
        """A PUBLISH was accepted (``ok``) or refused by the ACL."""
        self.windows.publish(client_id, self.clock(), topic, size, ok)
        self._active.add(client_id)

    def subscribed(self, client_id: str, topic_filter: str, ok: bool) -> None:
        """A subscription to one filter was granted (``ok``) or refused."""
        self.windows.subscribe(client_id, self.clock(), topic_filter, ok)
        self._active.add(client_id)

    def closed(self, link: Link, client_id: str) -> None:
        """The client's connection ended."""
        if self.links.get(client_id) is link:
            del self.links[client_id]
            self.windows.disconnect(client_id, self.clock())
            self._active.add(client_id)

    # -- scoring -------------------------------------------------------------------

    def tick(self) -> list[Verdict]:
        """Score every client active since the last tick; act on the abusive ones."""
        active, self._active = self._active, set()
        self.windows.flush(self.clock())  # completed windows are not needed any more
        clients = []
        rows = []
        now = self.clock()
        for cid in active:
            ban = self.banned.get(cid)
            if ban is not None and ban[0] > now:
                continue  # already dealt with
            if self.windows.events(cid) < self.min_events:
                continue  # too little evidence (a client that just connected and subscribed)
            row = self.windows.current(cid)
            if row is not None:
                clients.append(cid)
                rows.append(row)
        if not rows:
            return []
        labels, conf = self.scorer.predict(np.concatenate(rows))
        self.scored += len(clients)
        out = []
        for cid, lab, c in zip(clients, labels.tolist(), conf.tolist(), strict=True):
            if lab == 0 or c < self.min_confidence:
                continue
            out.append(self._act(cid, THREAT_LABELS[lab], float(c)))
        return out

    def _act(self, client: str, label: str, confidence: float) -> Verdict:
        self.detected[label] += 1
        now = self.clock()
        action = "logged"
        if self.action == "disconnect":
            if self.ban_s > 0:
                self.banned[client] = (now + self.ban_s, label)
            action = "banned"
            link = self.links.pop(client, None)
            if link is not None:
                self.disconnected += 1
                action = "disconnected"
                link.disconnect(REASONS[label], f"{label.replace('_', ' ')} detected")
        log.warning("intelligence: client %s looks like %s (%s %.2f, %s): %s", client, label,
                    self.scorer.source, confidence, self.scorer.version, action)
        v = Verdict(client, label, round(confidence, 3), action, time.time())
        self.recent.append(v)
        return v

    def status(self) -> dict[str, Any]:
        """Counters for ``$SYS`` and status."""
        now = self.clock()
        return {
            "scored": self.scored,
            "detected": dict(self.detected),
            "disconnected": self.disconnected,
            "refused_connects": self.refused,
            "banned": sum(1 for until, _ in self.banned.values() if until > now),
            "recent": [f"{v.client} {v.label} {v.action}" for v in self.recent],
        }
