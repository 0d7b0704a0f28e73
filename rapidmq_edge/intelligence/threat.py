"""Per-client behaviour watch: feed broker events, judge clients on evidence, act on abuse.

The broker connection calls the hooks (:meth:`ClientWatch.admit` before authentication,
then ``connected`` / ``published`` / ``subscribed`` / ``closed``); they only count: into
:class:`~.features.ClientWindows` (10 s windows the threat model scores) and, for
publications, into a per-client :class:`Pace`. Every ``interval`` seconds
:meth:`ClientWatch.tick` judges the clients that acted since the last tick.

A verdict needs **evidence** a person can check, not only the model's word: a healthy
sensor at 10 msg/s on one topic is never "topic scanning", whatever a classifier trained on
other devices thinks of it.

- **credential guessing**: at least ``auth_failures`` refused logins in the window;
- **topic scanning**: at least ``denied`` publications/subscriptions refused by the ACL,
  ``filters`` distinct subscription filters, or three broad filters (``#``, ``+``, ``$``)
  with a refusal;
- **flood**: the client sent more than it may — ``max(flood_rate, flood_factor x its own
  normal rate)`` messages per second, at most ``flood_factor x flood_rate`` (a bridge
  beyond that is exempted by configuration) — by more than its burst budget (``burst`` messages,
  plus twice its normal rate over the time it was away: a device catching up after an
  outage is not a flood); or ``connects`` connections in a window (a reconnect storm).

Guessing and scanning are judged when the threat model (or its rules) agrees with at least
``throttle_confidence``, or when the evidence is three times the threshold. Then:

- **guessing, scanning** (``action = "disconnect"``): DISCONNECT with a reason code, and the
  client id is refused (CONNACK 0x8A Banned) for ``ban_s`` seconds;
- **flood**: the client is **throttled** (``throttle_rate``, never below twice its own normal
  rate: its socket is not read while its token bucket is empty). A throttled client that
  keeps sending — ``backlog`` bytes waiting in its socket for ``escalate_after`` ticks —
  is disconnected and banned; one whose socket drains for ``lift_after`` ticks gets its
  rate back. A client id throttled within ``ban_s`` that floods again is disconnected.

Every verdict is counted, logged and handed to ``on_verdict`` (the runtime publishes it on
``$edge/alerts/threat/...``) with its evidence. ``action = "throttle"`` never disconnects;
``"log"`` only records.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Protocol

import numpy as np

from ..mqtt import reasons as rc
from .features import THREAT_LABELS, ClientWindows, WindowCounts
from .models import Scorer, Shadow

log = logging.getLogger(__name__)

#: DISCONNECT reason code per threat label
REASONS: dict[str, int] = {
    "credential_guessing": rc.NOT_AUTHORIZED,  # 0x87
    "topic_scanning": rc.NOT_AUTHORIZED,  # 0x87
    "flood": rc.MESSAGE_RATE_TOO_HIGH,  # 0x96
}
#: remembered recent verdicts (for $SYS and status)
RECENT = 20
#: a normal rate is learned upwards over about this long (s), and forgotten ten times slower
BASELINE_TAU = 60.0
#: the longest absence whose backlog earns burst budget (s)
MAX_AWAY = 86400.0


class Link(Protocol):
    """The part of a broker connection the watch acts on."""

    def disconnect(self, reason: int, why: str = "") -> None: ...
    def limit_rate(self, rate: float) -> None: ...
    def restore_rate(self) -> None: ...
    def pending_input(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Evidence:
    """The thresholds a verdict needs (per 10 s window unless said otherwise)."""

    auth_failures: int = 3
    denied: int = 3
    filters: int = 10
    connects: int = 20
    flood_rate: float = 200.0  # msg/s any client may sustain
    flood_factor: float = 10.0  # ... or this many times its own normal rate
    burst: int = 1000  # messages above that before it is a flood
    backlog: int = 65536  # bytes waiting in a throttled client's socket: it keeps sending


@dataclass(slots=True)
class Pace:
    """One client's publishing: its learned normal rate and how far it is above what it
    may send (a leaky bucket of ``excess`` messages against ``budget``)."""

    normal: float = 0.0  # msg/s, learned while it stays within its allowance
    excess: float = 0.0
    budget: float = 0.0
    last: float = 0.0  # time of the last publish counted
    count: int = 0  # publishes since the last tick
    tick_at: float = 0.0
    away_since: float | None = None
    throttled: bool = False
    full_ticks: int = 0  # ticks in a row with its socket backlog above the threshold
    calm_ticks: int = 0  # ticks in a row with its socket drained


@dataclass(slots=True)
class Verdict:
    """One abusive client, what was done, and the evidence."""

    client: str
    label: str
    confidence: float
    action: str
    at: float
    evidence: dict[str, Any] = field(default_factory=dict)


class ClientWatch:
    """Client-behaviour judge with its hooks for the broker connection."""

    def __init__(self, scorer: Scorer, action: str = "disconnect", ban_s: float = 60.0,
                 min_events: int = 10, min_confidence: float = 0.7,
                 clock: Callable[[], float] = time.monotonic, throttle_rate: float = 0.0,
                 throttle_confidence: float = 0.5, exempt_users: Sequence[str] = (),
                 exempt_clients: Sequence[str] = (), evidence: Evidence | None = None,
                 on_verdict: Callable[[Verdict], None] | None = None,
                 escalate_after: int = 3, lift_after: int = 5) -> None:
        self.scorer = scorer  # replaced whole by an OTA swap (between ticks, on the loop)
        #: a candidate threat model scoring the same rows beside the active one (OTA shadow)
        self.shadow: Shadow | None = None
        self.min_events = min_events
        self.min_confidence = min_confidence
        self.action = action
        self.ban_s = ban_s
        self.throttle_rate = throttle_rate
        self.throttle_confidence = min(throttle_confidence, min_confidence)
        self.ev = evidence or Evidence()
        self.on_verdict = on_verdict
        self.escalate_after = escalate_after
        self.lift_after = lift_after
        #: client id -> when its last throttle stops counting as a strike
        self.strikes: dict[str, float] = {}
        self.throttled = 0
        self.lifted = 0
        self.clock = clock
        self.windows = ClientWindows()
        self.links: dict[str, Link] = {}
        self.paces: dict[str, Pace] = {}
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

    @property
    def throttled_now(self) -> set[str]:
        """Client ids whose rate is limited right now."""
        return {c for c, p in self.paces.items() if p.throttled and c in self.links}

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
        now = self.clock()
        self.windows.connect(client_id, now, reason == 0, username)
        self._active.add(client_id)
        if reason == 0:
            self.links[client_id] = link
            pace = self.paces.get(client_id)
            if pace is None:
                pace = self.paces[client_id] = Pace(last=now, tick_at=now)
            # what it may have buffered while away is no flood when it catches up
            away = min(now - pace.away_since, MAX_AWAY) if pace.away_since else 0.0
            pace.budget = self.ev.burst + 2.0 * pace.normal * away
            pace.away_since = None
            pace.throttled = False
            pace.last = now

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None:
        """A PUBLISH was accepted (``ok``) or refused by the ACL."""
        if client_id in self.exempt:
            return
        now = self.clock()
        self.windows.publish(client_id, now, topic, size, ok)
        self._active.add(client_id)
        pace = self.paces.get(client_id)
        if pace is not None:
            allowed = self._allowed(pace)
            pace.excess = max(0.0, pace.excess + 1.0 - allowed * (now - pace.last))
            pace.last = now
            pace.count += 1

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
            now = self.clock()
            self.windows.disconnect(client_id, now)
            self._active.add(client_id)
            pace = self.paces.get(client_id)
            if pace is not None:
                pace.away_since = now
                pace.throttled = False

    # -- judging -------------------------------------------------------------------

    def tick(self) -> list[Verdict]:
        """Judge every client active since the last tick (and every throttled one)."""
        now = self.clock()
        active, self._active = self._active, set()
        active |= self.throttled_now
        if len(self.strikes) > 10_000:
            self.strikes = {c: s for c, s in self.strikes.items() if s > now}
        if len(self.paces) > 100_000:  # forget clients gone for long
            self.paces = {c: p for c, p in self.paces.items()
                          if c in self.links or (p.away_since or now) > now - MAX_AWAY}
        # a window the client's own next event closed since the last tick: its evidence
        # after that tick is judged too (on that window's counts), before the open one's
        closed = {c: w for c, w in self.windows.take_closed().items() if c in active}
        model = self._model(active, now)
        before = self._score(
            [(c, w) for c, w in closed.items() if w.events() >= self.min_events])
        out = []
        for cid in active:
            ban = self.banned.get(cid)
            if ban is not None and ban[0] > now:
                continue  # already dealt with
            w = closed.get(cid)
            v = None if w is None else self._ban_for(cid, now, w, *before.get(cid, (0, 0.0)))
            if v is None:
                v = self._judge(cid, now, *model.get(cid, (0, 0.0)))
            if v is not None:
                out.append(v)
        # completed windows are not needed any more, once judged: a tick that comes late
        # (a busy loop) judges an active client on the window its evidence is in, even
        # when that window has ended since
        self.windows.flush(now)
        return out

    def _model(self, active: set[str], now: float) -> dict[str, tuple[int, float]]:
        """The threat model's (label, probability) per client with enough events."""
        clients, rows = [], []
        for cid in active:
            if self.windows.events(cid) >= self.min_events:
                row = self.windows.current(cid)
                if row is not None:
                    clients.append(cid)
                    rows.append(row)
        return self._predict(clients, np.concatenate(rows) if rows else None)

    def _score(self, windows: list[tuple[str, WindowCounts]]) -> dict[str, tuple[int, float]]:
        """The threat model's (label, probability) of these (client, window)s."""
        if not windows:
            return {}
        span = self.windows.window
        return self._predict([c for c, _ in windows], np.asarray(
            [w.row(span) for _, w in windows], dtype=np.float32))

    def _predict(self, clients: list[str], X: np.ndarray | None
                 ) -> dict[str, tuple[int, float]]:
        if X is None:
            return {}
        t0 = time.thread_time()  # CPU time: the shadow compares costs
        labels, conf = self.scorer.predict(X)
        self.scored += len(clients)
        if self.shadow is not None:
            self.shadow.rows(X, labels, conf, time.thread_time() - t0)
        return {c: (int(lab), float(p)) for c, lab, p in
                zip(clients, labels.tolist(), conf.tolist(), strict=True)}

    def _judge(self, cid: str, now: float, label_i: int, conf: float) -> Verdict | None:
        w = self.windows.counts(cid)
        if w is not None:
            v = self._ban_for(cid, now, w, label_i, conf)
            if v is not None:
                return v
        return self._pace(cid, now, conf, {"model": THREAT_LABELS[label_i],
                                           "model_probability": round(conf, 3)})

    def _ban_for(self, cid: str, now: float, w: WindowCounts, label_i: int,
                 conf: float) -> Verdict | None:
        """A ban when window ``w`` of ``cid`` holds the evidence of an attack, else None."""
        ev = self.ev
        model = THREAT_LABELS[label_i] if conf >= self.throttle_confidence else "benign"
        evidence: dict[str, Any] = {"model": THREAT_LABELS[label_i],
                                    "model_probability": round(conf, 3)}
        if w.failures >= ev.auth_failures and (
                model == "credential_guessing" or w.failures >= 3 * ev.auth_failures):
            evidence.update(auth_failures=w.failures, connects=w.connects,
                            usernames=len(w.usernames))
            return self._ban(cid, "credential_guessing", max(conf, 0.5), evidence, now)
        denied = w.pub_denied + w.sub_denied
        filters = len(w.filters)
        if (denied >= ev.denied or filters >= ev.filters
                or (w.wildcards + w.sys_subs >= 3 and denied >= 1)) and (
                model == "topic_scanning" or denied >= 3 * ev.denied
                or filters >= 3 * ev.filters):
            evidence.update(denied=denied, filters=filters, broad_filters=w.wildcards
                            + w.sys_subs, topics=len(w.pub_topics))
            return self._ban(cid, "topic_scanning", max(conf, 0.5), evidence, now)
        if w.connects - w.failures >= ev.connects:
            evidence.update(connects=w.connects)
            return self._ban(cid, "flood", max(conf, 0.5), evidence, now)
        return None

    def _pace(self, cid: str, now: float, conf: float,
              evidence: dict[str, Any]) -> Verdict | None:
        """Learn the client's normal rate; throttle a flood, lift or escalate a throttle."""
        pace = self.paces.get(cid)
        link = self.links.get(cid)
        if pace is None or link is None:
            return None
        dt = max(now - pace.tick_at, 1e-3)
        rate = pace.count / dt
        pace.count, pace.tick_at = 0, now
        allowed = self._allowed(pace)
        pace.excess = max(0.0, pace.excess - allowed * max(0.0, now - pace.last))
        pace.last = now
        if pace.throttled:
            backlog = link.pending_input()
            if backlog >= self.ev.backlog:
                pace.full_ticks += 1
                pace.calm_ticks = 0
            else:
                pace.full_ticks = 0
                pace.calm_ticks += 1
            if pace.full_ticks >= self.escalate_after and self.action == "disconnect":
                evidence.update(backlog_bytes=backlog, throttled_to=self._limit(pace),
                                ticks=pace.full_ticks)
                return self._ban(cid, "flood", max(conf, 0.9), evidence, now)
            if pace.calm_ticks >= self.lift_after and pace.excess <= 0.0:
                pace.throttled = False
                pace.calm_ticks = 0
                self.lifted += 1
                link.restore_rate()
                log.info("intelligence: client %s sends at its own pace again: throttle lifted",
                         cid)
            return None
        if pace.excess > pace.budget:
            evidence.update(rate=round(rate, 1), allowed_rate=round(allowed, 1),
                            normal_rate=round(pace.normal, 3), excess=round(pace.excess),
                            budget=round(pace.budget))
            strike = self.strikes.get(cid, 0.0)
            if (strike > now or not self.throttle_rate) and self.action == "disconnect":
                return self._ban(cid, "flood", max(conf, 0.9), evidence, now)
            if self.throttle_rate and self.action != "log":
                pace.throttled = True
                pace.full_ticks = pace.calm_ticks = 0
                pace.excess = 0.0
                pace.budget = float(self.ev.burst)
                limit = self._limit(pace)
                link.limit_rate(limit)
                self.strikes[cid] = now + max(self.ban_s, self.windows.window)
                self.throttled += 1
                return self._record(cid, "flood", max(conf, 0.5), f"throttled to {limit:g}/s",
                                    evidence)
            pace.excess = 0.0
            return self._record(cid, "flood", max(conf, 0.5), "logged", evidence)
        if rate <= allowed and not pace.excess:  # this is how it normally publishes
            tau = BASELINE_TAU if rate > pace.normal else 10 * BASELINE_TAU
            pace.normal += (1.0 - math.exp(-dt / tau)) * (rate - pace.normal)
            if pace.budget > self.ev.burst:
                pace.budget = float(self.ev.burst)  # caught up: the normal budget again
        return None

    def _allowed(self, pace: Pace) -> float:
        """What the client may sustain: ``flood_rate``, or ``flood_factor`` times its normal
        rate up to ``flood_factor * flood_rate`` (beyond: exempt it in the configuration)."""
        ev = self.ev
        return max(ev.flood_rate, min(ev.flood_factor * pace.normal,
                                      ev.flood_factor * ev.flood_rate))

    def _limit(self, pace: Pace) -> float:
        """The throttle: ``throttle_rate``, never below twice the client's normal rate."""
        return max(self.throttle_rate, 2.0 * pace.normal)

    def _ban(self, client: str, label: str, confidence: float, evidence: dict[str, Any],
             now: float) -> Verdict:
        action = "logged"
        if self.action == "disconnect":
            if self.ban_s > 0:
                self.banned[client] = (now + self.ban_s, label)
            if label == "flood":  # back after its ban and flooding: no second throttle
                self.strikes[client] = now + 2 * max(self.ban_s, self.windows.window)
            action = "banned"
            link = self.links.pop(client, None)
            pace = self.paces.get(client)
            if pace is not None:
                pace.throttled = False
            if link is not None:
                self.disconnected += 1
                action = "disconnected"
                link.disconnect(REASONS[label], f"{label.replace('_', ' ')} detected")
        return self._record(client, label, confidence, action, evidence)

    def _record(self, client: str, label: str, confidence: float, action: str,
                evidence: dict[str, Any]) -> Verdict:
        self.detected[label] += 1
        log.warning("intelligence: client %s looks like %s (%s %.2f, %s): %s; evidence %s",
                    client, label, self.scorer.source, confidence, self.scorer.version, action,
                    evidence)
        v = Verdict(client, label, round(confidence, 3), action, time.time(), evidence)
        self.recent.append(v)
        if self.on_verdict is not None:
            self.on_verdict(v)
        return v

    def status(self) -> dict[str, Any]:
        """Counters for ``$SYS`` and status."""
        now = self.clock()
        return {
            "scored": self.scored,
            "detected": dict(self.detected),
            "throttled": self.throttled,
            "throttled_now": len(self.throttled_now),
            "throttles_lifted": self.lifted,
            "disconnected": self.disconnected,
            "refused_connects": self.refused,
            "banned": sum(1 for until, _ in self.banned.values() if until > now),
            "exempt_connected": len(self.exempt),
            "recent": [f"{v.client} {v.label} {v.action}" for v in self.recent],
        }
