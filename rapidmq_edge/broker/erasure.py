"""Erasure of one client from a running broker (``gateway.erasure_live`` calls it)."""

from __future__ import annotations

from ..mqtt import reasons as rc
from .broker import Broker

__all__ = ["erase_client"]


def erase_client(broker: Broker, client_id: str) -> dict[str, int]:
    """Forget what is held about ``client_id`` (an erasure): its connection closed
    (DISCONNECT 0x98) without its Will, its session (queue, in-flight, QoS 2 state),
    the retained messages it published (rows stored before origins were kept: those
    on a topic with the id as a level) and its messages queued or in flight to other
    sessions; the same rows deleted from the store. Counts by kind."""
    out = {"connections": 0, "sessions": 0, "subscriptions": 0, "retained": 0,
           "deliveries": 0}
    session = broker.sessions.get(client_id)
    if session is not None:
        session.will = None
        link = session.link
        if link is not None:
            out["connections"] = 1
            disconnect = getattr(link, "disconnect", None)
            if disconnect is not None:
                disconnect(rc.ADMINISTRATIVE_ACTION, "erased")
            broker.detach(session)
        out["deliveries"] += len(session.queue) + len(session.inflight)
        out["subscriptions"] = len(session.subscriptions)
        if broker.store is not None:
            broker.store.delete_session(client_id)  # whatever its expiry now
        broker.end_session(session)
        out["sessions"] = 1
    level = f"/{client_id}/"
    for topic, m in list(broker.retained.items()):
        if m.origin == client_id or (m.origin is None and level in f"/{topic}/"):
            del broker.retained[topic]
            if broker.store is not None:
                broker.store.delete_retained(topic)
            out["retained"] += 1
    for other in broker.sessions.values():
        mine = [d for d in other.queue if d.message.origin == client_id]
        if mine:
            other.queue = type(other.queue)(
                d for d in other.queue if d.message.origin != client_id)
            other.queued_bytes -= sum(len(d.message.payload) for d in mine)
        for pid, d in list(other.inflight.items()):
            if d.message.origin == client_id:
                del other.inflight[pid]  # a late PUBACK / PUBCOMP finds nothing
                mine.append(d)
        if broker.store is not None and other.persistent:
            for d in mine:
                if d.seq:
                    broker.store.delete_delivery(other.client_id, d.seq)
        out["deliveries"] += len(mine)
    for key in [k for k in broker._read_cache if k[1] == client_id]:
        del broker._read_cache[key]
    return out
