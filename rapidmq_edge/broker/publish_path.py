"""PUBLISH in and deliveries out of a broker connection.

:class:`PublishPath` is mixed into :class:`~.connection.ClientConnection`:

* a PUBLISH in: protocol checks, topic aliases, Receive Maximum, the publish rate, the ACL's
  decision (cached per topic), then the broker; acknowledged once what it was stored in has
  committed (``FlowControl._queue_ack``);
* the **planned forward**: a plain QoS 0/1 PUBLISH (no retain flag, no properties, no taps)
  to a topic with a route plan (``Broker.plan``) whose every subscriber is a connection of
  the publisher's protocol that can take it now is written to them first; the message, the
  in-flight records, the counts, the observers and the acknowledgement are made after, as
  the general path makes them, so a subscriber does not wait for them
  (``tests/test_broker_forward_planned.py`` runs one scenario both ways: the same bytes);
* deliveries out (the QoS 0 bytes of a message encoded once per protocol) and the QoS 1/2
  handshakes on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..mqtt import reasons as rc
from ..mqtt.codec import encode, encode_publish, encode_varint
from ..mqtt.errors import MqttError
from ..mqtt.packets import Packet, Puback, Pubcomp, Publish, Pubrec, Pubrel
from ..mqtt.properties import encode_properties
from .message import Delivery, Message, PublishRefused
from .negotiation import ConnectionSettings
from .policy import AccessPolicy, BehaviourObserver
from .session import Session

if TYPE_CHECKING:
    from .broker import Broker
    from .flow_control import FlowControl

__all__ = ["ACL_CACHE_SIZE", "PublishPath"]

log = logging.getLogger(__name__)

ACL_CACHE_SIZE = 1000  # PUBLISH decisions cached per client (then the cache starts anew)
_U16 = struct.Struct("!H")


class PublishPath:
    """PUBLISH in, deliveries out (mixed into ``ClientConnection``, whose ``__init__`` sets
    the attributes declared here)."""

    if not TYPE_CHECKING:  # no instance dict: ClientConnection declares the slots
        __slots__ = ()

    #: PUBLISHes to a topic with a route plan may take ``_forward_planned``
    forward_planned = True

    broker: Broker
    access: AccessPolicy
    settings: ConnectionSettings
    watch: BehaviourObserver | None
    version: int
    v5: bool
    session: Session | None
    client_id: str
    username: str | None
    closed: bool
    send_quota: int
    max_out_size: int
    alias_max_out: int
    aliases_out: dict[str, int]
    aliases_in: dict[int, str]
    publish_rate: float
    write_paused: bool
    _inbound_unacked: int
    _ack_backlog: bool
    _acl_cache: tuple[int, dict[str | tuple[str, int, bool], bool]] | None

    if TYPE_CHECKING:  # provided by ClientConnection and FlowControl
        transport: Any
        def disconnect(self, reason: int, why: str = "") -> None: ...
        def _write(self, data: bytes) -> None: ...
        def _queue_ack(self, ack: Packet, fut: asyncio.Future[None] | None,
                       then: Callable[[], None] | None = None,
                       msg: Message | None = None) -> None: ...
        def _throttle(self) -> None: ...
        def _wait_for_subscribers(self, blocked: list[FlowControl]) -> None: ...
        def _block_publisher(self) -> None: ...
        def congested(self) -> bool: ...

    # -- PUBLISH in ----------------------------------------------------------------

    def _on_publish(self, p: Publish) -> None:
        session = self.session
        if session is None:
            raise MqttError("PUBLISH before CONNECT")
        s = self.settings
        if p.qos > s.max_qos:
            self.disconnect(rc.QOS_NOT_SUPPORTED, "QoS not supported")
            return
        if p.retain and not s.retain_available:
            self.disconnect(rc.RETAIN_NOT_SUPPORTED, "retain not supported")
            return
        topic = p.topic
        props = p.properties
        if props:
            alias = props.get("topic_alias")
            if alias is not None:
                if alias > s.topic_alias_maximum:
                    self.disconnect(rc.TOPIC_ALIAS_INVALID, "topic alias out of range")
                    return
                if topic:
                    self.aliases_in[alias] = topic
                else:
                    known = self.aliases_in.get(alias)
                    if known is None:
                        self.disconnect(rc.PROTOCOL_ERROR, "unknown topic alias")
                        return
                    topic = known
        if p.qos:
            if self._inbound_unacked + len(session.inbound_qos2) >= s.receive_maximum:
                if self.v5:
                    self.disconnect(rc.RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded")
                    return
                # 3.1.1 has no Receive Maximum: push back instead (reading resumes in
                # _drain_acks once the acks waiting for the store drain)
                if self._inbound_unacked >= s.receive_maximum and not self._ack_backlog:
                    self._ack_backlog = True
                    self.transport.pause_reading()
            if p.qos == 2 and p.packet_id in session.inbound_qos2:
                self._queue_ack(Pubrec(p.packet_id), None)  # duplicate: acknowledge again
                return
        if self.publish_rate:
            self._throttle()
        broker = self.broker
        if topic.startswith("$SYS") or not self._may_publish(topic, p.qos, p.retain):
            if self.watch is not None:
                self.watch.published(self.client_id, topic, len(p.payload), False)
            broker.stats.acl_denied += 1
            log.info("client %s not authorised to publish to %s", self.client_id, topic)
            return self._ack_publish(p, rc.NOT_AUTHORIZED, None)
        if (p.qos < 2 and not props and not p.retain and not broker.taps
                and self.forward_planned and self._forward_planned(p)):
            return None
        if self.watch is not None:
            self.watch.published(self.client_id, topic, len(p.payload), True)
        expiry = None
        if props:
            props = dict(props)
            props.pop("topic_alias", None)
            expiry = props.pop("message_expiry_interval", None)
        msg = Message(
            topic, p.payload, p.qos, p.retain, props,
            time.time() + expiry if expiry is not None else None, self.client_id,
        )
        if p.raw is not None and "topic_alias" not in p.properties and expiry is None:
            msg.wire = {(self.v5, False): p.raw}
        blocked = broker.blocked_links
        mark = broker.store_mark()
        try:
            receivers = broker.publish(msg)
        except PublishRefused as exc:
            if self.v5:
                return self._ack_publish(p, exc.reason_code, None)
            return None  # 3.1.1 cannot say no: withhold the ack, the client resends
        if blocked:
            self._wait_for_subscribers(blocked)
        if p.qos:
            # 3.1.1 cannot refuse: its acknowledgement waits through a failed commit of the
            # session store for the retry (5.0 says 0x97 at once)
            fut = broker.commit_future(mark, not self.v5)
            self._ack_publish(p, rc.SUCCESS if receivers else rc.NO_MATCHING_SUBSCRIBERS, fut,
                              msg)

    def _forward_planned(self, p: Publish) -> bool:
        """The rest of ``_on_publish`` for a QoS 0/1 PUBLISH without retain flag or
        properties whose topic has a route plan (``Broker.plan``) and whose every delivery
        can be written now to a client of the same protocol: the deliveries are written
        first, then the message, the in-flight records, the counts, the observers and the
        acknowledgement are made as ``_on_publish``, ``Broker.publish`` and
        ``Session.deliver`` make them, so a subscriber does not wait for them. False, with
        nothing done, when the PUBLISH needs the general path."""
        broker = self.broker
        topic = p.topic
        plan = broker.plan(topic)
        if plan is False:
            return False
        sessions, grants = plan  # type: ignore[misc]
        qos = p.qos
        v5 = self.v5
        links: list[PublishPath] = []
        for target in sessions:  # a connection of another kind (mounted, in-process), of
            link = target.link   # another protocol, with topic aliases: the general path
            if (type(link) is not type(self) or link.v5 is not v5  # type: ignore[attr-defined]
                    or link.alias_max_out or link.closed):  # type: ignore[attr-defined]
                return False
            links.append(link)  # type: ignore[arg-type]
        payload = p.payload
        if qos:
            for i, link in enumerate(links):
                target = sessions[i]
                if grants[i] < qos or target.queue or len(target.inflight) >= link.send_quota:
                    return False
            tb = topic.encode()  # the PUBLISH around its packet identifier
            n = 4 + len(tb) + len(payload) + v5
            pre = (bytes((0x32, n)) if n < 128 else b"\x32" + encode_varint(n)) + \
                _U16.pack(len(tb)) + tb
            post = b"\x00" + payload if v5 else payload
            size = len(pre) + 2 + len(post)
            for link in links:
                if size > link.max_out_size:
                    return False
            pids = []
            for i, link in enumerate(links):
                pid = sessions[i].allocate_pid()
                link._write(pre + _U16.pack(pid) + post)
                pids.append(pid)
        else:
            raw = p.raw  # a PUBLISH received at QoS 0 is its own bytes
            if raw is None:
                return False
            for link in links:
                if len(raw) > link.max_out_size or link.congested():
                    return False
            for link in links:
                link._write(raw)
        # the rest of what _on_publish, Broker.publish, route and Session.deliver do
        if self.watch is not None:
            self.watch.published(self.client_id, topic, len(payload), True)
        msg = Message(topic, payload, qos, False, p.properties, None, self.client_id)
        st = broker.stats
        st.messages_received += 1
        st.received_by_qos[qos] += 1
        st.messages_sent += len(links)
        st.sent_by_qos[qos] += len(links)
        mark = 0
        if qos:
            mark = broker.store_mark()
            for i, pid in enumerate(pids):
                d = Delivery(msg, qos)
                sessions[i].track(d, pid)
                d.sent = True
        else:
            msg.wire = {(v5, False): raw}  # type: ignore[dict-item]
        for link in links:
            if link.write_paused:
                link._block_publisher()
        broker.routed(msg, len(links))
        blocked = broker.blocked_links
        if blocked:
            self._wait_for_subscribers(blocked)
        if qos:
            self._ack_publish(p, rc.SUCCESS if links else rc.NO_MATCHING_SUBSCRIBERS,
                              broker.commit_future(mark, not self.v5), msg)
        return True

    def _may_publish(self, topic: str, qos: int, retain: bool) -> bool:
        """The ACL's PUBLISH decision, cached per (topic, QoS, retain) for this client while
        the rules' ``generation`` stays (RBAC edits change it; the static ACL never does)."""
        access = self.access
        gen = getattr(access, "generation", 0)
        cache = self._acl_cache
        if cache is None or cache[0] != gen or len(cache[1]) > ACL_CACHE_SIZE:
            cache = self._acl_cache = (gen, {})
        key: str | tuple[str, int, bool] = (topic, qos, retain) if qos or retain else topic
        allowed = cache[1].get(key)
        if allowed is None:
            allowed = cache[1][key] = access.can_publish(
                self.username, self.client_id, topic, qos, retain)
        return allowed

    def _ack_publish(self, p: Publish, reason: int, fut: asyncio.Future[None] | None,
                     msg: Message | None = None) -> None:
        if not p.qos:
            return
        code = reason if self.v5 else 0
        if p.qos == 1:
            self._queue_ack(Puback(p.packet_id, code), fut, None, msg)
            return
        session = self.session
        assert session is not None
        if reason < 0x80 or not self.v5:
            session.add_inbound_qos2(p.packet_id)
            if session.persistent and session.store is not None:
                session.store.save_inbound_qos2(session.client_id, p.packet_id)
                # every durable store, this one included
                fut = self.broker.commit_future(patient=not self.v5)
        self._queue_ack(Pubrec(p.packet_id, code), fut, None, msg)

    def _on_pubrel(self, p: Pubrel) -> None:
        session = self.session
        assert session is not None
        if p.packet_id in session.inbound_qos2:
            session.inbound_qos2.discard(p.packet_id)
            fut = None
            if session.persistent and session.store is not None:
                session.store.delete_inbound_qos2(session.client_id, p.packet_id)
                # a crash must not leave the id behind: its reuse would look like a resend
                fut = session.store.commit_future()
            self._queue_ack(Pubcomp(p.packet_id), fut)
        else:
            code = rc.PACKET_IDENTIFIER_NOT_FOUND if self.v5 else 0
            self._queue_ack(Pubcomp(p.packet_id, code), None)

    # -- deliveries out ------------------------------------------------------------

    def _wire0(self, m: Message, retain: bool) -> bytes:
        """The QoS 0 PUBLISH of ``m`` for this client's protocol, encoded once per message
        (a PUBLISH received at QoS 0 is its own bytes)."""
        key = (self.v5, retain)
        wire = m.wire.get(key) if m.wire is not None else None
        if wire is None:
            wire = encode_publish(
                m.topic.encode(), m.payload, 0, retain, False, 0,
                encode_properties(m.properties) if self.v5 else None,
            )
            if m.wire is None:
                m.wire = {}
            m.wire[key] = wire
        return wire

    def send_plain(self, m: Message) -> bool:
        """Write ``m`` as a QoS 0 PUBLISH without retain flag or subscription identifier
        (what ``send_delivery`` does for such a delivery, without one)."""
        if m.expires_at is not None or self.alias_max_out:
            return self.send_delivery(Delivery(m, 0))
        cached = m.wire
        wire = cached.get((self.v5, False)) if cached is not None else None
        if wire is None:
            wire = self._wire0(m, False)
        if len(wire) > self.max_out_size:
            log.debug("dropping %d byte message for %s: above its maximum packet size",
                      len(wire), self.client_id)
            return False
        st = self.broker.stats
        st.messages_sent += 1
        st.sent_by_qos[0] += 1
        self._write(wire)
        if self.write_paused:
            self._block_publisher()
        return True

    def send_delivery(self, d: Delivery) -> bool:
        """Write a PUBLISH for ``d``; False when it is expired or too large to send."""
        m = d.message
        now = 0.0  # read only for an expiry
        if m.expires_at is not None:
            now = time.time()
            if now >= m.expires_at:
                return False
        v5 = self.v5
        if d.qos == 0 and not d.sub_ids and m.expires_at is None and not self.alias_max_out:
            wire = self._wire0(m, d.retain)
        else:
            topic = m.topic
            props = None
            if v5:
                props = m.outgoing_properties(now, d.sub_ids)
                if self.alias_max_out:
                    alias = self.aliases_out.get(topic)
                    if alias is not None:
                        props = {**props, "topic_alias": alias}
                        topic = ""
                    elif len(self.aliases_out) < self.alias_max_out:
                        alias = len(self.aliases_out) + 1
                        self.aliases_out[topic] = alias
                        props = {**props, "topic_alias": alias}
            wire = encode_publish(
                topic.encode(), m.payload, d.qos, d.retain, d.sent and d.qos > 0, d.packet_id,
                encode_properties(props) if v5 else None,
            )
        if len(wire) > self.max_out_size:
            log.debug("dropping %d byte message for %s: above its maximum packet size",
                      len(wire), self.client_id)
            return False
        d.sent = True
        st = self.broker.stats
        st.messages_sent += 1
        st.sent_by_qos[d.qos] += 1
        self._write(wire)
        if self.write_paused:
            self._block_publisher()
        return True

    def send_pubrel(self, packet_id: int) -> None:
        """Write a PUBREL (QoS 2, second phase)."""
        self._write(encode(Pubrel(packet_id), self.version))

    def _on_complete(self, pid: int) -> None:
        session = self.session
        assert session is not None
        session.complete(pid)
        session.pump()

    def _on_pubrec(self, p: Pubrec) -> None:
        session = self.session
        assert session is not None
        if p.reason_code >= 0x80:
            session.complete(p.packet_id)
            session.pump()
        elif session.released(p.packet_id):
            self.send_pubrel(p.packet_id)
        else:
            code = rc.PACKET_IDENTIFIER_NOT_FOUND if self.v5 else 0
            self._write(encode(Pubrel(p.packet_id, code), self.version))

