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

    mount: TenantMount

    def _on_publish(self, p: Publish) -> None:
        m = self.mount
        props = p.properties
        if props:
            props = m.inbound_properties(props)
        # a new packet: the raw bytes (forwarded as they are to QoS 0 subscribers) hold
        # the client's name; an empty topic (a topic alias in use) stays empty
        super()._on_publish(Publish(m.inbound(p.topic) if p.topic else "", p.payload, p.qos,
                                    p.retain, p.dup, p.packet_id, props))

    def _on_subscribe(self, p: Subscribe) -> None:
        mount = self.mount.filter
        super()._on_subscribe(Subscribe(p.packet_id, [(mount(f), o) for f, o in p.topics],
                                        p.properties))

    def _on_unsubscribe(self, p: Unsubscribe) -> None:
        mount = self.mount.filter
        super()._on_unsubscribe(Unsubscribe(p.packet_id, [mount(f) for f in p.topics],
                                            p.properties))

    def send_plain(self, m: Message) -> bool:
        return self.send_delivery(Delivery(m, 0))

    def send_delivery(self, d: Delivery) -> bool:
        """Deliver ``d`` under the client's name of its topic (never one outside the
        mountpoint, nor a ``$`` topic only a mounted wildcard matched)."""
        mount = self.mount
        m = d.message
        outer = mount.outbound(m.topic)
        if outer is None:
            return False
        if outer[0] == "$" and not (
                self.session is not None and mount.matched_by(outer, self.session.subscriptions)):
            return False
        props = mount.outbound_properties(m.properties) if m.properties else m.properties
        seen = Delivery(Message(outer, m.payload, m.qos, m.retain, props, m.expires_at, m.origin),
                        d.qos, d.retain, d.sub_ids, d.share, d.packet_id, d.released, d.seq,
                        d.sent)
        sent = super().send_delivery(seen)
        d.sent = seen.sent
        return sent
