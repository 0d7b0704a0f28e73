"""Who sends what, for the operator's view: counts per topic and per publisher, and the
MQTT clients' connections.

:class:`TrafficCounter` is a broker tap (it never refuses): one dict increment per message
for its topic and one for its publisher (``origin``), bounded in the number of keys.
:class:`ClientActivity` is the connections' :class:`~rapidmq_edge.broker.policy.BehaviourObserver`
in front of the threat watch (every hook is passed on): it remembers each MQTT client's
protocol, user and when it connected, and why the recent ones went away.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ..broker.message import Message
from ..broker.policy import BehaviourObserver

__all__ = ["ClientActivity", "ClientInfo", "TrafficCounter", "protocol_of"]

#: the most topics / publishers counted one by one; the rest are summed under ``OTHER``
MAX_KEYS = 10_000
OTHER = "(other)"
#: remembered disconnections
RECENT_CLOSES = 200


def protocol_of(origin: str | None) -> str:
    """The protocol a message came in by, from its publisher's id (the HTTP API names its
    clients ``http-...``, CoAP ``coap:...``, the gateway itself ``$edge``)."""
    if not origin:
        return "gateway"
    if origin.startswith("coap:"):
        return "coap"
    if origin.startswith("http-"):
        return "http"
    if origin.startswith("$"):
        return "gateway"
    return "mqtt"


class TrafficCounter:
    """A broker observer counting routed messages and payload bytes per topic and per
    publisher."""

    def __init__(self, max_keys: int = MAX_KEYS) -> None:
        self.max_keys = max_keys
        self.topics: dict[str, list[int]] = {}  # topic -> [messages, bytes]
        self.origins: dict[str, list[int]] = {}  # publisher -> [messages, bytes]

    def __call__(self, msg: Message) -> None:
        n = len(msg.payload)
        c = self.topics.get(msg.topic)
        if c is None:
            c = _counter(self.topics, msg.topic, self.max_keys)
        c[0] += 1
        c[1] += n
        origin = msg.origin or "$edge"
        c = self.origins.get(origin)
        if c is None:
            c = _counter(self.origins, origin, self.max_keys)
        c[0] += 1
        c[1] += n

    def by_protocol(self) -> dict[str, list[int]]:
        """Protocol -> [messages, bytes] so far."""
        out: dict[str, list[int]] = {}
        for origin, (msgs, size) in self.origins.items():
            c = out.setdefault(protocol_of(origin), [0, 0])
            c[0] += msgs
            c[1] += size
        return out


def _counter(table: dict[str, list[int]], key: str, limit: int) -> list[int]:
    """The [messages, bytes] of a key not in ``table`` yet (``OTHER``'s once it is full)."""
    if len(table) >= limit:
        key = OTHER
        c = table.get(key)
        if c is not None:
            return c
    c = table[key] = [0, 0]
    return c


@dataclass(slots=True)
class ClientInfo:
    """One MQTT client as the dashboard shows it."""

    client_id: str
    protocol: str  # mqtt (TCP), mqtt+tls, mqtt+ws
    version: int
    username: str | None
    peer: str
    connected_at: float
    refused_publishes: int = 0


class ClientActivity:
    """Connection hooks in front of the threat watch (``watch``, or None)."""

    def __init__(self, watch: BehaviourObserver | None = None) -> None:
        self.watch = watch
        self.clients: dict[str, ClientInfo] = {}
        #: (time, client id, why) of the recent disconnections, newest last
        self.closes: deque[tuple[float, str, str]] = deque(maxlen=RECENT_CLOSES)
        self.close_reasons: Counter[str] = Counter()

    # -- the BehaviourObserver hooks -------------------------------------------------

    def admit(self, client_id: str) -> int:
        return self.watch.admit(client_id) if self.watch is not None else 0

    def connected(self, link: Any, client_id: str, username: str | None, reason: int) -> None:
        if reason == 0:
            self.clients[client_id] = ClientInfo(
                client_id, _transport_kind(link), int(getattr(link, "version", 0) or 0),
                username, str(getattr(link, "peer", "")), time.time())
        if self.watch is not None:
            self.watch.connected(link, client_id, username, reason)

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None:
        if not ok and (info := self.clients.get(client_id)) is not None:
            info.refused_publishes += 1
        if self.watch is not None:
            self.watch.published(client_id, topic, size, ok)

    def subscribed(self, client_id: str, topic_filter: str, ok: bool) -> None:
        if self.watch is not None:
            self.watch.subscribed(client_id, topic_filter, ok)

    def closed(self, link: Any, client_id: str) -> None:
        info = self.clients.get(client_id)
        why = self._why(link, client_id)
        if info is not None:
            del self.clients[client_id]
        self.closes.append((time.time(), client_id, why))
        self.close_reasons[why] += 1
        if self.watch is not None:
            self.watch.closed(link, client_id)

    def _why(self, link: Any, client_id: str) -> str:
        """Why a connection ended, as far as it can be told from outside: the threat watch's
        verdict, a keep-alive timeout, a server-side DISCONNECT, or the client's side."""
        recent = getattr(self.watch, "recent", None)
        if recent:
            last = recent[-1]
            if last.client == client_id and time.time() - last.at < 5.0:
                return f"threat: {last.label}"
        keep_alive = getattr(link, "keep_alive", 0)
        loop = getattr(link, "loop", None)
        if keep_alive and loop is not None and \
                loop.time() - getattr(link, "last_rx", loop.time()) >= keep_alive * 1.5:
            return "keep-alive timeout"
        if getattr(link, "_linger", False):
            return "disconnected by the gateway"
        return "client or network"


#: the protocol name per transport class (TLS and WebSocket transports are classes of their
#: own): asked once per class, not at every CONNECT
_KINDS: dict[type, str] = {}


def _transport_kind(link: Any) -> str:
    transport = getattr(link, "transport", None)
    if transport is None:
        return "mqtt"
    kind = _KINDS.get(type(transport))
    if kind is None:
        kind = _KINDS[type(transport)] = _kind_of(transport)
    return kind


def _kind_of(transport: Any) -> str:
    if "websocket" in type(transport).__name__.lower():
        return "mqtt+ws"
    try:
        tls = transport.get_extra_info("sslcontext") is not None
    except Exception:  # pragma: no cover - a transport without extra info
        tls = False
    return "mqtt+tls" if tls else "mqtt"
