"""The connection of a client whose topics live below an invisible mountpoint (a tenant's).

:class:`MountedConnection` is what a :class:`~.connection.ClientConnection` becomes once
its CONNECT is accepted with a mountpoint (its class is switched; the slots are the same):
it moves the topics and filters it receives below the mountpoint before the broker sees
them and takes the mountpoint off what it delivers, with
:class:`~rapidmq_edge.mqtt.mountpoint.TenantMount`. Clients without a mountpoint keep the
plain class: the rewrite costs them nothing.
"""

from __future__ import annotations

from ..mqtt.mountpoint import TenantMount
from ..mqtt.packets import Publish, Subscribe, Unsubscribe
from .connection import ClientConnection
from .message import Delivery, Message

__all__ = ["MountedConnection"]


class MountedConnection(ClientConnection):
    """A :class:`ClientConnection` that rewrites topics at its edges through ``mount``."""

    __slots__ = ()

    forward_planned = False  # its topics are mounted: every PUBLISH takes _on_publish
    mount: TenantMount

    def _on_publish(self, p: Publish) -> None:
        m = self.mount
        props = p.properties
        if props:
            props = m.inbound_properties(props)
        # a new packet: the raw bytes (forwarded as they are to QoS 0 subscribers) hold
        # the client's name, which is what the tenant's subscribers get (see _seen); an
        # empty topic (a topic alias in use) stays empty
        raw = p.raw
        if raw is not None and p.topic and not props:
            _RECEIVED[m.prefix] = (p.payload, self.v5, raw)
        try:
            super()._on_publish(Publish(m.inbound(p.topic) if p.topic else "", p.payload,
                                        p.qos, p.retain, p.dup, p.packet_id, props))
        finally:
            if raw is not None:
                _RECEIVED.pop(m.prefix, None)

    def _on_subscribe(self, p: Subscribe) -> None:
        mount = self.mount.filter
        super()._on_subscribe(Subscribe(p.packet_id, [(mount(f), o) for f, o in p.topics],
                                        p.properties))

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        mount = self.mount.filter
        super()._on_unsubscribe(Unsubscribe(p.packet_id, [mount(f) for f in p.topics],
                                            p.properties))

    def _seen(self, m: Message) -> Message | None:
        """``m`` under the client's name of its topic; None when the client may not see it
        (outside the mountpoint, or a ``$`` topic only a mounted wildcard matched). Made
        once per message and mountpoint (route() delivers a message to its subscribers one
        after the other), so its encoded PUBLISH is shared by the tenant's subscribers."""
        mount = self.mount
        last = _LAST.get(mount.prefix)
        if last is not None and last[0] is m:
            seen = last[1]
        else:
            outer = mount.outbound(m.topic)
            if outer is None:
                return None
            props = mount.outbound_properties(m.properties) if m.properties else m.properties
            seen = Message(outer, m.payload, m.qos, m.retain, props, m.expires_at, m.origin)
            received = _RECEIVED.get(mount.prefix)
            if received is not None and received[0] is m.payload and m.expires_at is None:
                seen.wire = {(received[1], False): received[2]}  # the publisher's bytes
            _LAST[mount.prefix] = (m, seen)
        topic = seen.topic
        if topic[0] == "$" and not (self.session is not None
                                    and mount.matched_by(topic, self.session.subscriptions)):
            return None
        return seen

    def send_plain(self, m: Message) -> bool:
        seen = self._seen(m)
        return seen is not None and super().send_plain(seen)

    def send_delivery(self, d: Delivery) -> bool:
        """Deliver ``d`` under the client's name of its topic (see ``_seen``)."""
        seen = self._seen(d.message)
        if seen is None:
            return False
        shown = Delivery(seen, d.qos, d.retain, d.sub_ids, d.share, d.packet_id, d.released,
                         d.seq, d.sent)
        sent = super().send_delivery(shown)
        d.sent = shown.sent
        return sent


#: mountpoint -> (the last message delivered below it, as its clients see it)
_LAST: dict[str, tuple[Message, Message]] = {}
#: mountpoint -> (payload, MQTT 5, packet) of the PUBLISH being routed from one of its
#: clients: the QoS 0 PUBLISH its other clients get, byte for byte (as the plain path does)
_RECEIVED: dict[str, tuple[bytes, bool, bytes]] = {}
