"""The broker: sessions, routing, retained messages, Will messages, session expiry.

Transport-agnostic: connections (see ``connection.py``) call into it; it never touches a
socket. Durable state goes to :class:`~rapidmq_edge.store.session_store.SessionStore` as
the rows of :mod:`.persistence`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..mqtt import reasons as rc
from ..mqtt.packets import SubOptions
from ..mqtt.topics import is_wildcard, topic_matches, valid_subscription_filter
from ..store.session_store import SessionStore
from .message import Delivery, Message
from .persistence import ONLINE, load, retained_row, subscription_row
from .session import NEVER_EXPIRES, Link, Session
from .subscriptions import SharedGroup, Subscription, SubscriptionIndex
from .timer_wheel import TimerWheel

log = logging.getLogger(__name__)

READ_CACHE_SIZE = 50_000  # cached read-check answers (then the cache starts anew)
#: a topic's route for messages without retain: its sessions and their subscriptions' QoS
Plan = tuple[tuple[Session, ...], tuple[int, ...]]


@dataclass(slots=True)
class BrokerLimits:
    """The broker-wide limits taken from the configuration."""

    max_queued_messages: int = 1000
    max_queued_bytes: int = 0
    max_qos: int = 2
    retain_available: bool = True
    max_session_expiry: int = 604800


@dataclass(slots=True)
class Stats:
    """Counters published under ``$SYS/broker``."""

    started: float = field(default_factory=time.time)
    messages_received: int = 0
    messages_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    publish_dropped: int = 0
    connections_total: int = 0
    clients_connected: int = 0
    clients_maximum: int = 0
    #: PUBLISHes in / deliveries out by QoS (0, 1, 2)
    received_by_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    sent_by_qos: list[int] = field(default_factory=lambda: [0, 0, 0])
    #: messages that reached no local subscriber (they may still be forwarded upstream)
    no_subscribers: int = 0
    #: PUBLISHes refused by the ACL; packets over the maximum packet size; malformed packets
    #: (connections closed on them); PUBLISHes held back by a publish rate limit
    acl_denied: int = 0
    too_large: int = 0
    malformed: int = 0
    rate_limited: int = 0


class Broker:
    """All MQTT state of one gateway."""

    def __init__(
        self, limits: BrokerLimits, store: SessionStore | None = None,
        taps: Sequence[Callable[[Message], None]] = (),
        durable: Sequence[Callable[[], asyncio.Future[Any] | None]] = (),
        read_check: Callable[[str | None, str, str], bool] | None = None,
        observers: Sequence[Callable[[Message], None]] = (),
    ) -> None:
        self.limits = limits
        self.store = store
        self.sessions: dict[str, Session] = {}
        self.index = SubscriptionIndex()
        self.retained: dict[str, Message] = {}
        self.stats = Stats()
        #: connections whose socket was full when routing wrote to them (backpressure)
        self.blocked_links: list[Any] = []
        #: while a connection processes the bytes it read: the connections that queued
        #: output meanwhile, flushed when it is done (None: output goes out via call_soon;
        #: the empty tuple, connection.WRITE_NOW: at once)
        self.flush_queue: list[Any] | tuple[()] | None = None
        #: the connections' keep-alive / CONNECT deadlines (made by the first connection)
        self.wheel: TimerWheel | None = None
        #: the ACL's "read" check at delivery: (username, client id, topic) -> allowed
        self.read_check = read_check
        # its answers, cached while the rules' generation stays (the check's owner has a
        # ``generation`` when its rules can change at run time: RBAC; else they never do)
        owner: Any = getattr(read_check, "__self__", None)
        self._read_generation: Callable[[], int] | None = (
            (lambda: owner.generation) if hasattr(type(owner), "generation") else None)
        self._read_cache: dict[tuple[str | None, str, str], bool] = {}
        self._read_cache_gen = 0
        #: per topic, the sessions a QoS 0 message without retain goes to as a plain
        #: delivery (read check passed), or False when routing it needs the full path;
        #: valid while the index's generation is ``_plans_gen`` (emptied when sessions come
        #: and go, and with the read-check answers)
        self._plans: dict[str, Plan | bool] = {}
        self._plans_gen = -1
        #: commit futures the acknowledgement of a PUBLISH waits for besides the session
        #: store's: those of the stages behind the taps
        self._stages: tuple[Callable[[], asyncio.Future[Any] | None], ...] = tuple(durable)
        self._combined: tuple[tuple[asyncio.Future[Any], ...], asyncio.Future[Any]] | None = None
        #: called in order with every message accepted for routing: the pipeline's stages
        #: (each may raise PublishRefused: then nothing else happens)
        self.taps = tuple(taps)
        #: called with every message once it is routed (counters that never refuse: after
        #: the deliveries, which do not wait for them)
        self.observers = tuple(observers)
        #: restored sessions: the expiry time left (<= 0: expired while the gateway was down)
        self._expiry_left: dict[str, float] = {}
        if store is not None:
            self._restore(store)

    # -- start-up ------------------------------------------------------------------

    def _restore(self, store: SessionStore) -> None:
        stored, retained = load(store)
        now = time.time()
        for m in retained:
            if not m.expired(now):
                self.retained[m.topic] = m
        for s in stored.values():
            left = float(s.expiry_interval)
            if s.updated_at != ONLINE:  # the countdown started at the disconnect
                left = min(left, s.expiry_interval - (now - s.updated_at))
            self._expiry_left[s.client_id] = left
            session = self._new_session(s.client_id, s.version, s.expiry_interval)
            for filt, opts, sub_id in s.subscriptions:
                sub = Subscription(s.client_id, filt, opts, sub_id)
                session.subscriptions[filt] = sub
                self.index.add(sub)
            session.restore(s.deliveries, s.inbound_qos2)
            self.sessions[s.client_id] = session
        if stored or retained:
            log.info("restored %d sessions and %d retained messages", len(stored), len(retained))

    def start(self) -> None:
        """End restored sessions that expired while the gateway was down, arm the expiry
        timers of the others (call inside the running loop)."""
        left, self._expiry_left = self._expiry_left, {}
        expired = 0
        for session in list(self.sessions.values()):
            if session.link is not None:
                continue
            delay = left.get(session.client_id)
            if delay is not None and delay <= 0:
                self.end_session(session)  # deleted from the store too
                expired += 1
            else:
                self._arm_expiry(session, delay)
        if expired:
            log.info("%d stored sessions expired while the gateway was down", expired)

    def _new_session(self, client_id: str, version: int, expiry: int) -> Session:
        return Session(
            client_id, version, expiry, self.store,
            self.limits.max_queued_messages, self.limits.max_queued_bytes,
        )

    # -- connections ---------------------------------------------------------------

    def assign_client_id(self) -> str:
        """A fresh client identifier for a client that sent none."""
        return "auto-" + uuid.uuid4().hex

    def open_session(
        self, link: Link, client_id: str, clean_start: bool, expiry: int, version: int,
        username: str | None,
    ) -> tuple[Session, bool]:
        """Attach ``link`` to the client's session; return (session, session_present)."""
        old = self.sessions.get(client_id)
        if old is not None and old.link is not None:
            self._take_over(old, ends=clean_start or old.expiry_interval == 0)
        old = self.sessions.get(client_id)
        if old is not None:
            self._cancel_timers(old)
        present = False
        # A session with expiry 0 ends with its (taken-over) connection [MQTT-3.1.2-6]
        if old is not None and not clean_start and old.expiry_interval:
            old.will = None  # reconnected within the Will Delay: the Will is not sent
            session = old
            present = True
        else:  # a pending Will is sent as the old session ends
            if old is not None:
                self.end_session(old)
            session = self._new_session(client_id, version, expiry)
            self.sessions[client_id] = session
        self._plans.clear()  # a new session, or a user name the read check sees
        was_persistent = session.persistent
        session.version = version
        session.expiry_interval = expiry
        session.username = username
        session.link = link
        if self.store is not None:
            if session.persistent:  # connected: no expiry countdown (see connection_lost)
                self.store.save_session(client_id, version, expiry, ONLINE)
                if not was_persistent:
                    self._persist_whole(session)
            elif was_persistent:
                self.store.delete_session(client_id)
        st = self.stats
        st.connections_total += 1
        st.clients_connected += 1
        st.clients_maximum = max(st.clients_maximum, st.clients_connected)
        return session, present

    def _persist_whole(self, session: Session) -> None:
        store = self.store
        assert store is not None
        for sub in session.subscriptions.values():
            store.save_subscription(session.client_id, sub.filter,
                                    subscription_row(sub.options, sub.sub_id))

    def _take_over(self, old: Session, ends: bool) -> None:
        link = old.link
        assert link is not None
        will = old.will
        delay = _will_delay(will)
        old.will = None
        take_over = getattr(link, "take_over", None)
        if take_over is not None:
            take_over()
        self.detach(old)
        if will is not None and (delay == 0 or ends):
            self.publish_will(old.client_id, will)

    def detach(self, session: Session) -> None:
        """The session's connection is gone; the session lives on until it expires."""
        if session.link is None:
            return
        session.link = None
        self.stats.clients_connected -= 1
        for d in session.take_queued_shared():
            self._route_shared_again(d, exclude=session.client_id)

    def connection_lost(self, session: Session, send_will: bool) -> None:
        """A connection ended: send or schedule the Will, start session expiry."""
        if session.link is None:
            return
        self.detach(session)
        will = session.will
        if will is not None and not send_will:
            session.will = None
            will = None
        if session.expiry_interval == 0:
            if will is not None:
                session.will = None
                self.publish_will(session.client_id, will)
            self.end_session(session)
            return
        if will is not None:
            delay = _will_delay(will)
            if delay == 0:
                session.will = None
                self.publish_will(session.client_id, will)
            else:
                loop = asyncio.get_running_loop()
                session.will_timer = loop.call_later(delay, self._will_due, session)
        if self.store is not None and session.persistent:
            self.store.save_session(
                session.client_id, session.version, session.expiry_interval, time.time()
            )
        self._arm_expiry(session)

    def _arm_expiry(self, session: Session, delay: float | None = None) -> None:
        if session.expiry_interval == 0:
            self.end_session(session)
        elif session.expiry_interval != NEVER_EXPIRES:
            loop = asyncio.get_running_loop()
            session.expiry_timer = loop.call_later(
                session.expiry_interval if delay is None else delay, self._expire, session
            )

    def _will_due(self, session: Session) -> None:
        session.will_timer = None
        will, session.will = session.will, None
        if will is not None:
            self.publish_will(session.client_id, will)

    def _expire(self, session: Session) -> None:
        session.expiry_timer = None
        if session.link is None and self.sessions.get(session.client_id) is session:
            self.end_session(session)

    def _cancel_timers(self, session: Session) -> None:
        for name in ("will_timer", "expiry_timer"):
            h = getattr(session, name)
            if h is not None:
                h.cancel()
                setattr(session, name, None)

    def end_session(self, session: Session) -> None:
        """Discard a session: its subscriptions, queue and stored state."""
        self._cancel_timers(session)
        if session.will is not None:
            will, session.will = session.will, None
            self.publish_will(session.client_id, will)
        for filt in list(session.subscriptions):
            self.index.remove(session.client_id, filt)
        session.subscriptions.clear()
        leftovers = [d for d in session.queue if d.share] + [
            d for d in session.inflight.values() if d.share and not d.released
        ]
        session.queue.clear()
        session.inflight.clear()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self._plans.clear()
        if self.store is not None and session.expiry_interval:
            self.store.delete_session(session.client_id)
        for d in leftovers:
            self._route_shared_again(d, exclude=session.client_id)

    def publish_will(self, client_id: str, will: object) -> None:
        """Publish a Will Message on behalf of ``client_id``."""
        from ..mqtt.packets import Will

        assert isinstance(will, Will)
        props = dict(will.properties)
        props.pop("will_delay_interval", None)
        expiry = props.pop("message_expiry_interval", None)
        msg = Message(
            will.topic, will.payload, will.qos, will.retain, props,
            time.time() + expiry if expiry is not None else None, client_id,
        )
        self.publish(msg)

    # -- publishing ----------------------------------------------------------------

    def publish(self, msg: Message) -> int:
        """Pass ``msg`` through the taps, store it if retained, route it, tell the observers;
        return the number of receivers."""
        st = self.stats
        st.messages_received += 1
        st.received_by_qos[msg.qos] += 1
        for tap in self.taps:
            tap(msg)  # may raise PublishRefused: then nothing else happens
        if msg.retain:
            self._retain(msg)
        n = self.route(msg)
        self.routed(msg, n)
        return n

    def routed(self, msg: Message, n: int) -> None:
        """``msg`` went to ``n`` receivers: count a message nobody got, tell the observers."""
        if not n:
            self.stats.no_subscribers += 1
        for observe in self.observers:
            observe(msg)

    def store_mark(self) -> int:
        """The session store's change count, for :meth:`commit_future`'s ``since``."""
        return self.store.changes if self.store is not None else 0

    def commit_future(self, since: int | None = None,
                      patient: bool = False) -> asyncio.Future[Any] | None:
        """Resolved when every durable change made so far is committed (None: nothing to wait).

        ``since``: :meth:`store_mark` taken before a message was published; if the message
        changed nothing in the session store (no retained row, no stored delivery) its
        acknowledgement does not wait for that store, nor for an older commit of it that
        keeps failing (a full disk). ``patient``: a failed session-store commit does not
        fail the future, the retry of the same changes resolves it (the stages' failures
        still do: what they failed to store is not retried). The stages share one future
        per group commit; so does this (the combination of the same futures is made once).
        Await it through ``asyncio.shield`` where the awaiting task may be cancelled.
        """
        first: asyncio.Future[Any] | None = None
        more: list[asyncio.Future[Any]] | None = None
        store = self.store
        if store is not None and (since is None or store.changes != since):
            first = store.commit_future(patient)
        for src in self._stages:
            f = src()
            if f is None:
                continue
            if first is None:
                first = f
            elif more is None:
                more = [first, f]
            else:
                more.append(f)
        if more is None:
            return first
        key = tuple(more)
        combined = self._combined
        if combined is not None and combined[0] == key and not combined[1].done():
            return combined[1]
        fut = asyncio.gather(*more)
        self._combined = (key, fut)
        return fut

    def _retain(self, msg: Message, persist: bool = True) -> None:
        if not msg.payload:
            if self.retained.pop(msg.topic, None) is not None and self.store is not None:
                self.store.delete_retained(msg.topic)
            return
        self.retained[msg.topic] = msg
        if persist and self.store is not None and not msg.topic.startswith("$SYS"):
            self.store.save_retained(msg.topic, retained_row(msg))

    def route(self, msg: Message) -> int:
        """Deliver ``msg`` to every matching subscription; return the number of receivers."""
        topic = msg.topic
        if not msg.retain:  # the hot path: the topic's plan, if it has one
            plan = self.plan(topic)
            if plan is not False:
                sessions, grants = plan  # type: ignore[misc]
                n = 0
                if not msg.qos:
                    for session in sessions:
                        if session.deliver_plain(msg):
                            n += 1
                        else:
                            self.stats.publish_dropped += 1
                    return n
                for session, granted in zip(sessions, grants, strict=True):
                    qos = msg.qos if msg.qos < granted else granted
                    if session.deliver(Delivery(msg, qos)) if qos else session.deliver_plain(msg):
                        n += 1
                    else:
                        self.stats.publish_dropped += 1
                return n
        per_client, groups = self.index.match(topic)
        sessions = self.sessions
        read_check = self.read_check
        cache = self._read_answers() if read_check is not None else None
        n = 0
        for cid, subs in per_client.items():
            session = sessions.get(cid)
            if session is None:
                continue
            if cache is not None:
                key = (session.username, cid, topic)
                allowed = cache.get(key)
                if allowed is None:
                    assert read_check is not None
                    allowed = cache[key] = read_check(session.username, cid, topic)
                if not allowed:
                    continue
            if len(subs) == 1:
                sub = subs[0]
                o = sub.options
                if o.no_local and msg.origin == cid:
                    continue
                qos = msg.qos if msg.qos < o.qos else o.qos
                retain = msg.retain and o.retain_as_published
                if not qos and not retain and not sub.sub_id:  # the common QoS 0 case
                    if session.deliver_plain(msg):
                        n += 1
                    else:
                        self.stats.publish_dropped += 1
                    continue
                d = Delivery(msg, qos, retain, (sub.sub_id,) if sub.sub_id else ())
            else:
                d_opt = _merge(msg, cid, subs)
                if d_opt is None:
                    continue
                d = d_opt
            if session.deliver(d):
                n += 1
            else:
                self.stats.publish_dropped += 1
        for g in groups:
            if self._deliver_shared(g, msg):
                n += 1
        return n

    def plan(self, topic: str) -> Plan | bool:
        """The sessions a message without retain on ``topic`` is delivered to, in
        ``route``'s order, with their subscriptions' QoS (a QoS 0 delivery is a plain
        one); False when a match needs more (a shared group, overlapping subscriptions,
        No Local, a subscription identifier)."""
        plans = self._plans
        gen = self.index.generation
        if gen != self._plans_gen or len(plans) > READ_CACHE_SIZE:
            plans.clear()
            self._plans_gen = gen
        cache = self._read_answers() if self.read_check is not None else None
        known = plans.get(topic)
        if known is not None:
            return known
        per_client, groups = self.index.match(topic)
        sessions: list[Session] = []
        grants: list[int] = []
        plan: Plan | bool = False
        if not groups:
            for cid, subs in per_client.items():
                session = self.sessions.get(cid)
                if session is None:
                    continue
                if len(subs) != 1 or subs[0].options.no_local or subs[0].sub_id:
                    break
                if cache is not None:
                    key = (session.username, cid, topic)
                    allowed = cache.get(key)
                    if allowed is None:
                        assert self.read_check is not None
                        allowed = cache[key] = self.read_check(session.username, cid, topic)
                    if not allowed:
                        continue
                sessions.append(session)
                grants.append(subs[0].options.qos)
            else:
                plan = (tuple(sessions), tuple(grants))
        plans[topic] = plan
        return plan

    def _read_answers(self) -> dict[tuple[str | None, str, str], bool]:
        """The cache of ``read_check``'s answers (bounded; emptied when the rules'
        generation moves)."""
        cache = self._read_cache
        gen_of = self._read_generation
        if gen_of is not None:
            gen = gen_of()
            if gen != self._read_cache_gen:
                cache.clear()
                self._plans.clear()
                self._read_cache_gen = gen
        if len(cache) > READ_CACHE_SIZE:
            cache.clear()
            self._plans.clear()
        return cache

    def _deliver_shared(self, g: SharedGroup, msg: Message, exclude: str | None = None) -> bool:
        members = [m for m in g.members.values() if m.client_id != exclude]
        if self.read_check is not None:
            members = [m for m in members if self._may_read(m.client_id, msg.topic)]
        if not members:
            return False
        online = [m for m in members if (s := self.sessions.get(m.client_id)) and s.link]
        pool = online or members
        g.cursor = (g.cursor + 1) % len(pool)
        for i in range(len(pool)):
            sub = pool[(g.cursor + i) % len(pool)]
            session = self.sessions.get(sub.client_id)
            if session is None:
                continue
            o = sub.options
            d = Delivery(
                msg, min(msg.qos, o.qos), msg.retain and o.retain_as_published,
                (sub.sub_id,) if sub.sub_id else (), g.key,
            )
            if session.deliver(d):
                return True
        self.stats.publish_dropped += 1
        return False

    def _may_read(self, client_id: str, topic: str) -> bool:
        session = self.sessions.get(client_id)
        check = self.read_check
        return session is not None and (
            check is None or check(session.username, client_id, topic)
        )

    def _route_shared_again(self, d: Delivery, exclude: str) -> None:
        if d.share is None or d.message.expired(time.time()):
            return
        g = self.index.group(d.share)
        if g is not None:
            self._deliver_shared(g, d.message, exclude=exclude)

    # -- subscriptions -------------------------------------------------------------

    def subscribe(
        self, session: Session, filt: str, opts: SubOptions, sub_id: int | None,
        checked: bool = False,
    ) -> tuple[int, bool]:
        """Add a subscription; return (granted QoS or reason code, existed before).
        ``checked``: the caller found ``valid_subscription_filter(filt)`` true."""
        if not checked and not valid_subscription_filter(filt):
            return rc.TOPIC_FILTER_INVALID, False
        qos = min(opts.qos, self.limits.max_qos)
        if qos != opts.qos:
            opts = SubOptions(qos, opts.no_local, opts.retain_as_published, opts.retain_handling)
        sub = Subscription(session.client_id, filt, opts, sub_id)
        existed = self.index.add(sub)
        session.subscriptions[filt] = sub
        if self.store is not None and session.persistent:
            self.store.save_subscription(session.client_id, filt, subscription_row(opts, sub_id))
        return qos, existed

    def unsubscribe(self, session: Session, filt: str) -> bool:
        """Remove a subscription; return True when it existed."""
        if session.subscriptions.pop(filt, None) is None:
            return False
        self.index.remove(session.client_id, filt)
        if self.store is not None and session.persistent:
            self.store.delete_subscription(session.client_id, filt)
        if filt.startswith("$share/"):
            for d in session.take_queued_shared():
                if d.share == filt:
                    self._route_shared_again(d, exclude=session.client_id)
                else:
                    session.deliver(d)
        return True

    def send_retained(self, session: Session, filt: str, opts: SubOptions, existed: bool) -> None:
        """Send retained messages matching a new subscription, per its Retain Handling."""
        if filt.startswith("$share/") or opts.retain_handling == 2:
            return
        if opts.retain_handling == 1 and existed:
            return
        if is_wildcard(filt):
            matches = [m for t, m in self.retained.items() if topic_matches(filt, t)]
        else:
            m = self.retained.get(filt)
            if m is None:  # the common case: nothing retained there
                return
            matches = [m]
        now = time.time()
        sub = session.subscriptions.get(filt)
        sub_ids = (sub.sub_id,) if sub is not None and sub.sub_id else ()
        for m in matches:
            if m.expired(now):
                self.retained.pop(m.topic, None)
                continue
            if not self._may_read(session.client_id, m.topic):
                continue
            session.deliver(Delivery(m, min(m.qos, opts.qos), True, sub_ids))

    # -- housekeeping --------------------------------------------------------------

    def publish_internal(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish a broker-generated message (e.g. ``$SYS``); not persisted."""
        msg = Message(topic, payload, 0, retain)
        if retain:
            self._retain(msg, persist=False)
        self.route(msg)

    async def close(self) -> None:
        """Flush durable state (sessions stay as they are for the next start)."""
        for s in self.sessions.values():
            self._cancel_timers(s)
        if self.store is not None:
            now = time.time()
            for s in self.sessions.values():
                # still connected: its countdown starts now; a disconnected session keeps
                # the time of its disconnect (the countdown goes on while the gateway is down)
                if s.persistent and s.link is not None:
                    self.store.save_session(s.client_id, s.version, s.expiry_interval, now)
            await self.store.close()

    def forget_reads(self, client_id: str) -> None:
        """Drop the cached read decisions of ``client_id`` (an erasure)."""
        for key in [k for k in self._read_cache if k[1] == client_id]:
            del self._read_cache[key]


def _will_delay(will: object) -> int:
    props = getattr(will, "properties", None) or {}
    return int(props.get("will_delay_interval", 0))


def _merge(msg: Message, cid: str, subs: list[Subscription]) -> Delivery | None:
    """Overlapping subscriptions of one client: one delivery, max QoS, every identifier."""
    qos = -1
    retain = False
    ids: list[int] = []
    for sub in subs:
        o = sub.options
        if o.no_local and msg.origin == cid:
            continue
        qos = max(qos, min(msg.qos, o.qos))
        retain = retain or (msg.retain and o.retain_as_published)
        if sub.sub_id:
            ids.append(sub.sub_id)
    if qos < 0:
        return None
    return Delivery(msg, qos, retain, tuple(ids))
