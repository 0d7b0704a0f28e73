"""Per-client behaviour watch: feed broker events, score clients, act on abuse.

The broker connection calls the hooks (:meth:`ClientWatch.admit` before authentication,
then ``connected`` / ``published`` / ``subscribed`` / ``closed``); they only count, into
:class:`~.features.ClientWindows`. Every ``interval`` seconds :meth:`ClientWatch.tick`
scores the open window of each client that acted since the last tick (one batch) and, for a
client judged abusive, records why (log, counters, :meth:`ClientWatch.status`) and acts:

- **throttle** (``throttle_rate`` > 0): a connected client judged abusive but not certainly
  (probability in ``[throttle_confidence, min_confidence)``), or flooding for the first
  time, gets its PUBLISH rate limited to ``throttle_rate`` per second (the connection's
  token bucket: its socket is not read while the bucket is empty); its window restarts;
- **disconnect** (``action = "disconnect"``): a client judged abusive with at least
  ``min_confidence`` — credential guessing or topic scanning at once, a flood only when the
  client was throttled already (it kept flooding at its limit, or came back within
  ``ban_s`` of its throttle or its ban) — is closed with an MQTT 5 DISCONNECT carrying a
  reason code, and its client id is refused (CONNACK 0x8A Banned) for ``ban_s`` seconds.

``action = "throttle"`` never disconnects; ``"log"`` only records.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
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

    def limit_rate(self, rate: float) -> None: ...


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
                 clock: Callable[[], float] = time.monotonic, throttle_rate: float = 0.0,
                 throttle_confidence: float = 0.5, exempt_users: Sequence[str] = (),
                 exempt_clients: Sequence[str] = ()) -> None:
        self.scorer = scorer
        self.min_events = min_events
        self.min_confidence = min_confidence
        self.action = action
        self.ban_s = ban_s
        self.throttle_rate = throttle_rate
        self.throttle_confidence = min(throttle_confidence, min_confidence)
        #: client id -> (when its last throttle expires as a strike, label)
        self.strikes: dict[str, tuple[float, str]] = {}
        self.throttled_now: set[str] = set()
        self.throttled = 0
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
        self.exempt_users = tuple(exempt_users)
        self.exempt_clients = tuple(exempt_clients)
        #: connected exempt clients (matched at CONNECT): client id -> its connection
        self.exempt: dict[str, Link] = {}

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
        """A CONNECT was answered with ``reason`` (0 = accepted). An accepted client whose
        username or client id matches an exempt pattern is not watched while connected."""
        if reason == 0 and (
            any(fnmatchcase(client_id, p) for p in self.exempt_clients)
            or (username is not None
                and any(fnmatchcase(username, p) for p in self.exempt_users))
        ):
            self.exempt[client_id] = link
            return
        self.exempt.pop(client_id, None)
        self.windows.connect(client_id, self.clock(), reason == 0, username)
        self._active.add(client_id)
        if reason == 0:
            self.links[client_id] = link

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None:
        """A PUBLISH was accepted (``ok``) or refused by the ACL."""
        if client_id in self.exempt:
            return
        self.windows.publish(client_id, self.clock(), topic, size, ok)
        self._active.add(client_id)

    def subscribed(self, client_id: str, topic_filter: str, ok: bool) -> None:
        """A subscription to one filter was granted (``ok``) or refused."""
        if client_id in self.exempt:
            return
        self.windows.subscribe(client_id, self.clock(), topic_filter, ok)
        self._active.add(client_id)

    def closed(self, link: Link, client_id: str) -> None:
        """The client's connection ended."""
        if self.exempt.get(client_id) is link:
            del self.exempt[client_id]
            return
        if self.links.get(client_id) is link:
            del self.links[client_id]
            self.throttled_now.discard(client_id)
            self.windows.disconnect(client_id, self.clock())
            self._active.add(client_id)

    # -- scoring -------------------------------------------------------------------

    def tick(self) -> list[Verdict]:
        """Score every client active since the last tick; act on the abusive ones."""
        active, self._active = self._active, set()
        if len(self.strikes) > 10_000:
            now = self.clock()
            self.strikes = {c: s for c, s in self.strikes.items() if s[0] > now}
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
            if lab == 0 or c < self.throttle_confidence:
                continue
            v = self._act(cid, THREAT_LABELS[lab], float(c))
            if v is not None:
                out.append(v)
        return out

    def _throttle_first(self, client: str, label: str, confidence: float, now: float) -> bool:
        """Whether this verdict throttles the client rather than disconnecting it."""
        if not self.throttle_rate or self.action == "log" or client not in self.links:
            return False
        if client in self.throttled_now:
            return False  # throttled already: escalate (or nothing, below min_confidence)
        strike = self.strikes.get(client)
        if strike is not None and strike[0] > now and confidence >= self.min_confidence:
            return False  # throttled before and back at it: no second throttle
        return (confidence < self.min_confidence or label == "flood"
                or self.action == "throttle")

    def _act(self, client: str, label: str, confidence: float) -> Verdict | None:
        now = self.clock()
        if self._throttle_first(client, label, confidence, now):
            self.links[client].limit_rate(self.throttle_rate)
            self.throttled_now.add(client)
            self.strikes[client] = (now + max(self.ban_s, self.windows.window), label)
            self.windows.restart(client, now)  # judged again on what it does from now on
            self.throttled += 1
            return self._record(client, label, confidence,
                                f"throttled to {self.throttle_rate:g}/s")
        if confidence < self.min_confidence:
            return None  # not certain: a throttled client stays throttled
        if client in self.throttled_now and self.action == "throttle":
            return None
        action = "logged"
        if self.action == "disconnect":
            if self.ban_s > 0:
                self.banned[client] = (now + self.ban_s, label)
            if client in self.strikes:  # a repeat offender is not throttled after its ban
                self.strikes[client] = (now + 2 * max(self.ban_s, self.windows.window), label)
            action = "banned"
            link = self.links.pop(client, None)
            self.throttled_now.discard(client)
            if link is not None:
                self.disconnected += 1
                action = "disconnected"
                link.disconnect(REASONS[label], f"{label.replace('_', ' ')} detected")
        return self._record(client, label, confidence, action)

    def _record(self, client: str, label: str, confidence: float, action: str) -> Verdict:
        self.detected[label] += 1
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
            "throttled": self.throttled,
            "throttled_now": len(self.throttled_now),
            "disconnected": self.disconnected,
            "refused_connects": self.refused,
            "banned": sum(1 for until, _ in self.banned.values() if until > now),
            "exempt_connected": len(self.exempt),
            "recent": [f"{v.client} {v.label} {v.action}" for v in self.recent],
        }
