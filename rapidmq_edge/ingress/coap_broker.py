"""The CoAP publish-subscribe broker's logic: what its aiocoap resources do.

:class:`CoapBroker` holds the state of the CoAP ingress of one gateway (the OSCORE
identities, the topics created through the collection, the observations) and implements
the methods of the resources of :mod:`rapidmq_edge.ingress.coap_server` on the broker:
identity (anonymous or OSCORE), publish and delete (answered after the durable commit,
If-Match / If-None-Match against the retained value), read with ETag, the topic resources
(their representation, creation, search by parameters) and Observe as an MQTT
subscription through a :class:`~rapidmq_edge.broker.local.LocalClient`. A refused request
raises :class:`~rapidmq_edge.coap.pubsub.Refusal` (code, diagnostic payload, optional
Max-Age); the pure pubsub vocabulary is in :mod:`rapidmq_edge.coap.pubsub`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from typing import Any

import aiocoap
from aiocoap.blockwise import _extract_block_key
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from ..broker.broker import Broker
from ..broker.local import LocalClient, publish
from ..broker.message import Message, PublishRefused
from ..broker.policy import AccessPolicy
from ..coap.pubsub import (
    PARAMS,
    Refusal,
    conf_representation,
    content_format_for,
    content_type_for,
    etag_of,
    has_all,
    is_text,
    parse_parameters,
    topic_configuration,
)
from ..config.ingress import CoapSettings
from ..mqtt.mountpoint import TenantMount
from ..mqtt.topics import is_wildcard, valid_topic_name

__all__ = ["OBSERVE_QUEUE", "CoapBroker"]

log = logging.getLogger(__name__)

#: notifications queued per observation before the oldest are dropped (RFC 7641 §4.5:
#: observers only need the latest state eventually)
OBSERVE_QUEUE = 256


def _etag(msg: Message) -> bytes:
    return etag_of(msg.payload, msg.properties.get("content_type"))


def _answer(code: Any, why: str = "", max_age: int | None = None) -> Any:
    resp = aiocoap.Message(code=code, payload=why.encode())
    if max_age is not None:
        resp.opt.max_age = max_age
    return resp


class CoapBroker:
    """The state and logic shared by the CoAP resources of one gateway."""

    def __init__(self, broker: Broker, access: AccessPolicy, settings: CoapSettings) -> None:
        self.broker = broker
        self.access = access
        self.settings = settings
        self.oscore_names: dict[int, str] = {}
        #: topics created through POST /ps -> their optional parameters, in memory
        self.created: dict[str, dict[int, Any]] = {}
        self.observers: set[LocalClient] = set()
        self._obs_seq = secrets.randbelow(1 << 23)
        self._obs_ids = 0
        #: publications handed to the broker, by QoS (the ``protocol="coap"`` series)
        self.published_by_qos = [0, 0, 0]
        self._mounts: dict[str, TenantMount] = {}

    # -- who is asking -------------------------------------------------------------

    def identity(self, request: Any) -> tuple[str | None, str]:
        """(username, client id) of a request; raises Refusal when OSCORE is required."""
        remote = request.remote
        ctx = getattr(remote, "security_context", None)
        name = self.oscore_names.get(id(ctx)) if ctx is not None else None
        if name is None:
            if ctx is not None or self.settings.require_oscore:
                raise Refusal(Code.UNAUTHORIZED, "OSCORE required")
            remote_id = getattr(remote, "hostinfo", "?")
            return None, f"coap:{remote_id}"
        return name, f"coap:{name}"

    def mount_of(self, username: str | None) -> TenantMount | None:
        """The invisible mountpoint of an identity's tenant: its resource paths name topics
        below it (None: the broker's topics)."""
        prefix = self.access.mountpoint_of(username)
        if prefix is None:
            return None
        mount = self._mounts.get(prefix)
        if mount is None:
            mount = self._mounts[prefix] = TenantMount(prefix)
        return mount

    def broker_topic(self, username: str | None, topic: str) -> str:
        """The broker's topic of a resource path's topic for this identity."""
        mount = self.mount_of(username)
        return topic if mount is None else mount.inbound(topic)

    def topic_of(self, path: tuple[str, ...]) -> str:
        """The MQTT topic of a resource path below a prefix; raises Refusal (4.00)."""
        topic = "/".join(path)
        if not path or not valid_topic_name(topic):
            raise Refusal(Code.BAD_REQUEST, "invalid topic")
        return topic

    def next_observe(self) -> int:
        self._obs_seq = (self._obs_seq + 1) & 0xFFFFFF
        return self._obs_seq

    # -- publish ---------------------------------------------------------------------

    def check_size(self, request: Any, assembled: bool = False) -> Any:
        """A 4.13 response when the (announced, partly received or assembled) payload is
        over ``max_payload``: checked on every Block1 block before it is spooled."""
        limit = self.settings.max_payload
        size = len(request.payload)
        b1 = request.opt.block1
        if b1 is not None and not assembled:
            size += b1.start
        if request.opt.size1 is not None and not assembled:
            size = max(size, request.opt.size1)
        if size <= limit:
            return None
        resp = _answer(Code.REQUEST_ENTITY_TOO_LARGE, f"payload over {limit} bytes")
        resp.opt.size1 = limit
        return resp

    async def publish(self, request: Any, topic: str, retain: bool) -> Any:
        """PUT/POST: publish to ``topic``, answer after the commit."""
        username, client_id = self.identity(request)
        if not topic.startswith("$"):
            topic = self.broker_topic(username, topic)
        if topic.startswith("$") or not self.access.can_publish(username, client_id, topic):
            log.info("CoAP client %s not authorised to publish to %s", client_id, topic)
            raise Refusal(Code.FORBIDDEN, "not authorised")
        too_large = self.check_size(request, assembled=True)
        if too_large is not None:
            return too_large
        props: dict[str, Any] = {}
        cf = request.opt.content_format
        if cf is not None:
            content_type = content_type_for(int(cf))
            if content_type is None:
                raise Refusal(Code.UNSUPPORTED_CONTENT_FORMAT, f"content-format {int(cf)}")
            props["content_type"] = content_type
            if is_text(content_type):
                try:
                    request.payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise Refusal(Code.BAD_REQUEST, "payload is not UTF-8") from None
                props["payload_format_indicator"] = 1
        if retain:
            self.check_conditions(request, topic)
        if retain and not request.payload:
            # an empty retained message deletes the value: that is DELETE's job
            raise Refusal(Code.BAD_REQUEST, "empty payload (use DELETE to clear)")
        qos = 1 if request.mtype == Type.CON else 0
        msg = Message(topic, request.payload, qos, retain, props, None, client_id)
        # the draft: the first publication to a topic (it had no data) is 2.01 Created
        created = retain and self.current(topic) is None
        await self._commit(msg)
        return aiocoap.Message(code=Code.CREATED if created else Code.CHANGED)

    def current(self, topic: str) -> Message | None:
        """The topic's data (its retained message), None when it has none."""
        msg = self.broker.retained.get(topic)
        return msg if msg is not None and msg.payload else None

    def check_conditions(self, request: Any, topic: str) -> None:
        """If-None-Match / If-Match (RFC 7252 §5.10.8) against the retained value; an
        If-Match ETag matches the tag GET responses carry (:func:`etag_of`)."""
        current = self.current(topic)
        if request.opt.if_none_match and current is not None:
            raise Refusal(Code.PRECONDITION_FAILED, "topic has data")
        if_match = request.opt.if_match
        if if_match and (current is None or not any(
                not tag or tag == _etag(current) for tag in if_match)):
            raise Refusal(Code.PRECONDITION_FAILED, "no matching representation")

    async def _commit(self, msg: Message) -> None:
        retry = self.settings.retry_after
        self.published_by_qos[msg.qos] += 1
        try:
            fut = publish(self.broker, msg)
        except PublishRefused as exc:
            raise Refusal(Code.SERVICE_UNAVAILABLE, str(exc) or "refused", retry) from None
        if fut is not None:
            try:
                await fut
            except Exception as exc:  # noqa: BLE001 - any store failure: not stored
                log.warning("CoAP publication to %s not stored: %s", msg.topic, exc)
                raise Refusal(Code.SERVICE_UNAVAILABLE, f"not stored: {exc}", retry) from None

    async def delete(self, request: Any, topic: str) -> Any:
        """DELETE: clear the retained value (observers see the topic go away)."""
        username, client_id = self.identity(request)
        if not topic.startswith("$"):
            topic = self.broker_topic(username, topic)
        if topic.startswith("$") or not self.access.can_publish(username, client_id, topic):
            raise Refusal(Code.FORBIDDEN, "not authorised")
        if topic in self.broker.retained:
            qos = 1 if request.mtype == Type.CON else 0
            await self._commit(Message(topic, b"", qos, True, {}, None, client_id))
        return aiocoap.Message(code=Code.DELETED)

    # -- read --------------------------------------------------------------------

    def may_read(self, username: str | None, client_id: str, topic: str) -> bool:
        if not self.access.can_subscribe(username, client_id, topic):
            return False
        check = self.broker.read_check
        return check is None or check(username, client_id, topic)

    def representation(self, msg: Message) -> Any:
        """A 2.05 response carrying ``msg``, in its content format, with its ETag."""
        resp = aiocoap.Message(code=Code.CONTENT, payload=msg.payload)
        cf = content_format_for(msg.properties.get("content_type"))
        if cf is not None:
            resp.opt.content_format = cf
        resp.opt.etag = _etag(msg)
        return resp

    def get(self, request: Any, topic: str) -> Any:
        username, client_id = self.identity(request)
        topic = self.broker_topic(username, topic)
        if not self.may_read(username, client_id, topic):
            raise Refusal(Code.FORBIDDEN, "not authorised")
        msg = self.current(topic)
        if msg is None:
            if self.created.get(topic, {}).get(PARAMS["initialize"]) is True:
                return aiocoap.Message(code=Code.CONTENT)  # created with "initialize"
            raise Refusal(Code.NOT_FOUND, "no data published")
        tag = _etag(msg)
        if tag in request.opt.etags:  # the client's cached copy is current (§5.10.6.2)
            resp = aiocoap.Message(code=Code.VALID)
            resp.opt.etag = tag
            return resp
        return self.representation(msg)

    def known_topics(self) -> list[str]:
        """Retained topics, exact subscriptions, created topics."""
        topics = {t for t in self.broker.retained if not t.startswith("$")}
        for session in self.broker.sessions.values():
            for filt in session.subscriptions:
                if not is_wildcard(filt) and not filt.startswith("$"):
                    topics.add(filt)
        topics.update(self.created)
        return sorted(topics)

    def conf(self, topic: str, name: str | None = None) -> dict[int, Any]:
        """The topic resource's representation: the draft's CBOR map (integer keys);
        ``name``: the topic as the asking client names it (below a mountpoint)."""
        msg = self.current(topic)
        cf = content_format_for(msg.properties.get("content_type")) if msg else None
        return conf_representation(name or topic, self.created.get(topic, {}), cf)

    def create(self, request: Any) -> tuple[str, dict[int, Any]]:
        """POST to the collection: validate a topic configuration, remember the topic."""
        username, client_id = self.identity(request)
        name, spec = topic_configuration(parse_parameters(request.payload))
        name = self.topic_of(tuple(name.split("/")))
        topic = name if name.startswith("$") else self.broker_topic(username, name)
        if topic.startswith("$") or not (
            self.access.can_publish(username, client_id, topic)
            or self.access.can_subscribe(username, client_id, topic)
        ):
            raise Refusal(Code.FORBIDDEN, "not authorised")
        if topic in self.known_topics():
            raise Refusal(Code.BAD_REQUEST, "topic-name already in use")
        self.created[topic] = spec
        return name, self.conf(topic, name)

    def matching(self, username: str | None, client_id: str,
                 wanted: dict[int, Any]) -> list[str]:
        """Readable topics whose representation has every (key, value) of ``wanted``, as
        this identity names them."""
        mount = self.mount_of(username)
        out = []
        for topic in self.known_topics():
            name = topic if mount is None else mount.outbound(topic)
            if name is None or name.startswith("$"):
                continue
            if not self.may_read(username, client_id, topic):
                continue
            if has_all(self.conf(topic, name), wanted):
                out.append(name)
        return out

    # -- observe ---------------------------------------------------------------------

    async def observe(self, pipe: Any, cache: Any, topic: str) -> None:
        """GET with Observe: 0: an MQTT subscription whose deliveries become notifications."""
        request = pipe.request
        username, client_id = self.identity(request)
        topic = self.broker_topic(username, topic)
        if not self.may_read(username, client_id, topic):
            raise Refusal(Code.FORBIDDEN, "not authorised")
        queue: deque[Message] = deque(maxlen=OBSERVE_QUEUE)
        wake = asyncio.Event()

        def deliver(msg: Message, retained: bool) -> None:
            queue.append(msg)
            wake.set()

        self._obs_ids += 1
        lc = LocalClient(self.broker, f"{client_id}:obs{self._obs_ids}", deliver, username)
        self.observers.add(lc)
        try:
            code = lc.subscribe(topic)
            if code >= 0x80:
                raise Refusal(Code.BAD_REQUEST, "cannot subscribe")
            if queue:
                first = self._notification(request, cache, queue.popleft())
            else:  # no value yet: the observation waits for the first publication
                first = aiocoap.Message(code=Code.CONTENT)
            first.opt.observe = self.next_observe()
            pipe.add_response(first, is_last=False)
            while True:
                await wake.wait()
                wake.clear()
                while queue:
                    msg = queue.popleft()
                    if msg.retain and not msg.payload:  # topic data deleted
                        pipe.add_response(_answer(Code.NOT_FOUND, "deleted"), is_last=True)
                        return
                    resp = self._notification(request, cache, msg)
                    resp.opt.observe = self.next_observe()
                    pipe.add_response(resp, is_last=False)
        finally:
            self.observers.discard(lc)
            lc.close()

    def _notification(self, request: Any, cache: Any, msg: Message) -> Any:
        """A notification; too large for one datagram: its first block (RFC 7959 §2.6)."""
        resp = self.representation(msg)
        remote = request.remote
        if len(resp.payload) <= remote.maximum_payload_size:
            return resp
        cache._completes[_extract_block_key(request)] = resp  # for the follow-up GETs
        szx = remote.maximum_block_size_exp
        if request.opt.block2 is not None:
            szx = min(szx, request.opt.block2.size_exponent)
        block = resp._extract_block(0, szx, remote.maximum_payload_size)
        block.opt.size2 = len(resp.payload)
        return block

    def close_observers(self) -> None:
        for lc in list(self.observers):
            lc.close()
        self.observers.clear()
