"""Broker state as the session store's rows, and back.

:class:`~rapidmq_edge.store.session_store.SessionStore` keeps rows of plain values and opaque
bytes; this module is what they mean: subscription options, deliveries with their message
and MQTT properties, retained messages. The broker and its sessions write through the
``*_row`` functions; :func:`load` turns the rows read at start-up into sessions to restore.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..mqtt.errors import MqttError
from ..mqtt.packets import PUBLISH, SubOptions
from ..mqtt.properties import decode_properties, encode_properties
from ..store.session_store import DeliveryRow, RetainedRow, SessionStore, SubscriptionRow
from .message import Delivery, Message

__all__ = [
    "ONLINE", "StoredSession", "delivery_row", "load", "retained_row", "subscription_row",
]

#: ``updated_at`` of a session stored while its client is connected: its expiry countdown
#: has not started (otherwise ``updated_at`` is when the client disconnected)
ONLINE = 0.0


@dataclass(slots=True)
class StoredSession:
    """A persistent session as loaded at start-up."""

    client_id: str
    version: int
    expiry_interval: int
    updated_at: float
    subscriptions: list[tuple[str, SubOptions, int | None]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    inbound_qos2: set[int] = field(default_factory=set)


def subscription_row(opts: SubOptions, sub_id: int | None) -> SubscriptionRow:
    """The stored form of a subscription's options."""
    return (opts.qos, int(opts.no_local), int(opts.retain_as_published), opts.retain_handling,
            sub_id)


def delivery_row(d: Delivery) -> DeliveryRow:
    """The stored form of a delivery (its message included)."""
    m = d.message
    return (m.topic, m.payload, m.qos, d.qos, int(d.retain), encode_properties(m.properties),
            m.expires_at, json.dumps(d.sub_ids), d.share, d.packet_id, int(d.released),
            m.origin)


def retained_row(m: Message) -> RetainedRow:
    """The stored form of a retained message (its topic is the key)."""
    return (m.payload, m.qos, encode_properties(m.properties), m.expires_at, m.origin)


def _properties(blob: bytes) -> dict[str, Any]:
    try:
        return decode_properties(blob, 0, len(blob), PUBLISH)[0]
    except MqttError:
        return {}


def load(store: SessionStore) -> tuple[dict[str, StoredSession], list[Message]]:
    """Every persistent session and retained message in ``store`` (call before serving)."""
    rows = store.load()
    sessions = {cid: StoredSession(cid, v, e, u) for cid, v, e, u in rows.sessions}
    for cid, filt, qos, nl, rap, rh, sid in rows.subscriptions:
        if cid in sessions:
            sessions[cid].subscriptions.append((filt, SubOptions(qos, bool(nl), bool(rap), rh),
                                                sid))
    for (cid, seq, topic, payload, msg_qos, qos, retain, props, exp, sub_ids, share, pid,
         released, origin) in rows.deliveries:
        if cid not in sessions:
            continue
        msg = Message(topic, bytes(payload), msg_qos, bool(retain), _properties(props), exp,
                      origin)
        sessions[cid].deliveries.append(Delivery(
            msg, qos, bool(retain), tuple(json.loads(sub_ids)), share, pid, bool(released), seq))
    for cid, pid in rows.inbound_qos2:
        if cid in sessions:
            sessions[cid].inbound_qos2.add(pid)
    retained = [Message(t, bytes(p), q, True, _properties(pr), exp, origin)
                for t, p, q, pr, exp, origin in rows.retained]
    return sessions, retained
