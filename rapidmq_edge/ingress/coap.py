"""CoAP publish-subscribe broker (RFC 7252, RFC 7641, RFC 7959, draft-ietf-core-coap-pubsub).

Resources (every CoAP resource maps one-to-one onto an MQTT topic of the same broker):

- ``/ps`` (``rt="core.ps core.ps.coll"``): the topic collection. GET lists the topic
  resources the client may read (retained topics, topics with exact subscriptions, topics
  created through the collection) as link-format (``?rt=core.ps.data``: their topic-data
  resources); FETCH with a CBOR map of topic parameters lists the topics whose
  representation contains all of them; POST with a topic configuration (CBOR map, the
  draft's integer keys or parameter names: ``topic-name`` required, ``resource-type``
  ``core.ps.data``, optional ``topic-content-format``, ``topic-type``, ``initialize``)
  creates a topic resource (2.01, Location-Path ``ps/conf/a/b``; 4.00 when the name is in
  use or a parameter is unknown or not implemented).
- ``/ps/conf/<topic>`` (``rt="core.ps.conf"``): the topic resource. GET returns its
  configuration (CBOR map with integer keys: topic-name 0, topic-data 1, resource-type 2,
  topic-content-format 3, topic-type 4, ...), FETCH with ``{10: [...]}`` (conf-filter) a part
  of it; DELETE removes the topic: the retained value is cleared and the observers get a
  final 4.04.
- ``/ps/data/<topic>``: the topic-data resource (``core.ps.data``) of MQTT topic
  ``<topic>``. PUT publishes the *last value* (MQTT retain = 1; 2.01 Created for the first
  value of a topic, 2.04 after), POST publishes an event (retain = 0, 2.04); both are QoS 1
  when sent as CON and QoS 0 as NON, and are answered only once the message is committed to
  every durable store (the session store and the store-and-forward queue). GET returns the
  retained value with an ETag (2.03 Valid when the request names it; 4.04 before any value,
  as the draft's "half created" topic); GET with Observe is an MQTT subscription through a
  :class:`~rapidmq_edge.broker.local.LocalClient` whose deliveries become notifications.
  DELETE clears the retained value (2.02) and ends the observations with 4.04.

Plain publications (PUT/POST without Block1, OSCORE or conditions) never reach aiocoap:
the listener's socket is a :class:`~rapidmq_edge.coap.endpoint.UdpEndpoint` whose fast path
(:mod:`.coap_fast`) publishes them with the same checks and answers, and sheds load with
4.29 + Max-Age; everything else is served by the aiocoap resources below through the same
socket.

Content-Format and the MQTT 5 ``content_type`` property are translated both ways;
text formats (text/plain, JSON, ...) also set ``payload_format_indicator`` = 1.

Security: the MQTT ACL applies. Anonymous CoAP clients are user ``None``; requests
protected with OSCORE (RFC 8613) are the user named like their security context
(a sub-directory of ``coap.oscore_dir``, see :func:`provision_device`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections import deque
from typing import Any
from urllib.parse import quote

from ..broker.broker import Broker
from ..broker.local import LocalClient, publish
from ..broker.message import Message, PublishRefused
from ..config_ingress import CoapSettings
from ..mqtt.topics import is_wildcard, valid_topic_name
from ..security.gatekeeper import Gatekeeper
from ..security.oscore import load_contexts, provision_device

try:  # optional dependency: the gateway runs without CoAP when it is missing
    import aiocoap
    import aiocoap.interfaces
    import aiocoap.resource
    from aiocoap.blockwise import _extract_block_key
    from aiocoap.numbers.codes import Code
    from aiocoap.numbers.contentformat import ContentFormat
    from aiocoap.numbers.types import Type
except ImportError:  # pragma: no cover - exercised only without the extra installed
    aiocoap = None

log = logging.getLogger(__name__)

#: notifications queued per observation before the oldest are dropped (RFC 7641 §4.5:
#: observers only need the latest state eventually)
OBSERVE_QUEUE = 256
#: text content formats (MQTT payload_format_indicator = 1)
_TEXT_TYPES = ("text/", "application/json", "application/senml+json", "application/xml",
               "application/link-format", "application/senml+xml")
#: MQTT content types that name a CoAP content format differently than aiocoap's registry
_ALIASES = {
    "text/plain": 0,
    "text/plain;charset=utf-8": 0,
    "text/plain; charset=utf-8": 0,
    "application/json;charset=utf-8": 50,
}
#: the CBOR map of a topic resource; "application/core-pubsub+cbor" has no number yet, so
#: the generic application/cbor (60) is used, with the draft's integer keys (below)
CONF_CONTENT_FORMAT = 60
RT_COLLECTION = "core.ps core.ps.coll"
RT_CONF = "core.ps.conf"
RT_DATA = "core.ps.data"
#: draft-ietf-core-coap-pubsub "CoAP Pubsub Parameters": name -> CBOR key
PARAMS = {
    "topic-name": 0, "topic-data": 1, "resource-type": 2, "topic-content-format": 3,
    "topic-type": 4, "expiration-date": 5, "max-subscribers": 6, "observer-check": 7,
    "topic-history": 8, "initialize": 9, "conf-filter": 10,
}
PARAM_NAMES = {v: k for k, v in PARAMS.items()}
#: parameters a client may set when creating a topic (the others are not implemented:
#: 4.00, as the draft requires for unrecognised ones)
SETTABLE = frozenset({"topic-name", "resource-type", "topic-content-format", "topic-type",
                      "initialize"})
#: critical options understood here (or by aiocoap below the resources): If-Match,
#: Uri-Host, If-None-Match, Uri-Port, Uri-Path, Uri-Path-Abbrev, Uri-Query, Accept,
#: Block2, Block1
HANDLED_OPTIONS = frozenset({1, 3, 5, 7, 11, 13, 15, 17, 23, 27})
DATA_PREFIX = ("ps", "data")
CONF_PREFIX = ("ps", "conf")


# --------------------------------------------------------------------------- content formats


def content_type_for(cf: int) -> str | None:
    """MQTT ``content_type`` for a CoAP content-format number; None when unknown."""
    fmt = ContentFormat(cf)
    if not fmt.is_known() or fmt.encoding != "identity":
        return None
    return str(fmt.media_type).replace("; ", ";")


def content_format_for(content_type: str | None) -> int | None:
    """CoAP content-format number for an MQTT ``content_type``; None when it has none."""
    if not content_type:
        return None
    ct = content_type.strip()
    alias = _ALIASES.get(ct.lower())
    if alias is not None:
        return alias
    try:
        return int(ContentFormat.by_media_type(ct))
    except KeyError:
        try:
            return int(ContentFormat.by_media_type(ct.lower()))
        except KeyError:
            return None


def _is_text(content_type: str) -> bool:
    return content_type.startswith(_TEXT_TYPES)


def topic_href(prefix: tuple[str, ...], topic: str) -> str:
    """The URI path of a topic resource: every MQTT level is one percent-encoded segment."""
    return "/" + "/".join(prefix) + "/" + "/".join(quote(s, safe="") for s in topic.split("/"))


# --------------------------------------------------------------------------- the server


class _Refusal(Exception):
    """A request answered with an error code, a diagnostic payload and maybe Max-Age."""

    def __init__(self, code: Any, why: str, max_age: int | None = None) -> None:
        super().__init__(why)
        self.code = code
        self.max_age = max_age


def _answer(code: Any, why: str = "", max_age: int | None = None) -> Any:
    resp = aiocoap.Message(code=code, payload=why.encode())
    if max_age is not None:
        resp.opt.max_age = max_age
    return resp


def etag_of(msg: Message) -> bytes:
    """The ETag of a topic's current value (RFC 7252 §5.10.6): 8 bytes of a hash of its
    payload and content type, so equal representations have equal tags."""
    h = hashlib.blake2b(msg.payload, digest_size=8)
    h.update(b"\0" + str(msg.properties.get("content_type") or "").encode())
    return h.digest()


def _cbor_map(payload: bytes) -> dict[int, Any]:
    """A pubsub parameter map (integer or name keys) with integer keys; raises _Refusal."""
    import cbor2

    try:
        spec = cbor2.loads(payload) if payload else None
    except Exception:  # noqa: BLE001 - any decoding problem is the client's
        spec = None
    if not isinstance(spec, dict):
        raise _Refusal(Code.BAD_REQUEST, "expected a CBOR map of topic parameters")
    out: dict[int, Any] = {}
    for key, value in spec.items():
        number = PARAMS.get(key) if isinstance(key, str) else key
        if not isinstance(number, int) or isinstance(number, bool) or number not in PARAM_NAMES:
            raise _Refusal(Code.BAD_REQUEST, f"unknown topic parameter {key!r}")
        out[number] = value
    return out


class CoapBroker:
    """The state and logic shared by the CoAP resources of one gateway."""

    def __init__(self, broker: Broker, gate: Gatekeeper, settings: CoapSettings) -> None:
        self.broker = broker
        self.gate = gate
        self.settings = settings
        self.oscore_names: dict[int, str] = {}
        #: topics created through POST /ps -> their optional parameters, in memory
        self.created: dict[str, dict[int, Any]] = {}
        self.observers: set[LocalClient] = set()
        self._obs_seq = secrets.randbelow(1 << 23)
        self._obs_ids = 0

    # -- who is asking -------------------------------------------------------------

    def identity(self, request: Any) -> tuple[str | None, str]:
        """(username, client id) of a request; raises _Refusal when OSCORE is required."""
        remote = request.remote
        ctx = getattr(remote, "security_context", None)
        name = self.oscore_names.get(id(ctx)) if ctx is not None else None
        if name is None:
            if ctx is not None or self.settings.require_oscore:
                raise _Refusal(Code.UNAUTHORIZED, "OSCORE required")
            remote_id = getattr(remote, "hostinfo", "?")
            return None, f"coap:{remote_id}"
        return name, f"coap:{name}"

    def topic_of(self, path: tuple[str, ...]) -> str:
        """The MQTT topic of a resource path below a prefix; raises _Refusal (4.00)."""
        topic = "/".join(path)
        if not path or not valid_topic_name(topic):
            raise _Refusal(Code.BAD_REQUEST, "invalid topic")
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
        if topic.startswith("$") or not self.gate.can_publish(username, client_id, topic):
            log.info("CoAP client %s not authorised to publish to %s", client_id, topic)
            raise _Refusal(Code.FORBIDDEN, "not authorised")
        too_large = self.check_size(request, assembled=True)
        if too_large is not None:
            return too_large
        props: dict[str, Any] = {}
        cf = request.opt.content_format
        if cf is not None:
            content_type = content_type_for(int(cf))
            if content_type is None:
                raise _Refusal(Code.UNSUPPORTED_CONTENT_FORMAT, f"content-format {int(cf)}")
            props["content_type"] = content_type
            if _is_text(content_type):
                try:
                    request.payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Refusal(Code.BAD_REQUEST, "payload is not UTF-8") from None
                props["payload_format_indicator"] = 1
        if retain:
            self.check_conditions(request, topic)
        if retain and not request.payload:
            # an empty retained message deletes the value: that is DELETE's job
            raise _Refusal(Code.BAD_REQUEST, "empty payload (use DELETE to clear)")
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
            raise _Refusal(Code.PRECONDITION_FAILED, "topic has data")
        if_match = request.opt.if_match
        if if_match and (current is None or not any(
                not tag or tag == etag_of(current) for tag in if_match)):
            raise _Refusal(Code.PRECONDITION_FAILED, "no matching representation")

    async def _commit(self, msg: Message) -> None:
        retry = self.settings.retry_after
        try:
            fut = publish(self.broker, msg)
        except PublishRefused as exc:
            raise _Refusal(Code.SERVICE_UNAVAILABLE, str(exc) or "refused", retry) from None
        if fut is not None:
            try:
                await fut
            except Exception as exc:  # noqa: BLE001 - any store failure: not stored
                log.warning("CoAP publication to %s not stored: %s", msg.topic, exc)
                raise _Refusal(Code.SERVICE_UNAVAILABLE, f"not stored: {exc}", retry) from None

    async def delete(self, request: Any, topic: str) -> Any:
        """DELETE: clear the retained value (observers see the topic go away)."""
        username, client_id = self.identity(request)
        if topic.startswith("$") or not self.gate.can_publish(username, client_id, topic):
            raise _Refusal(Code.FORBIDDEN, "not authorised")
        if topic in self.broker.retained:
            qos = 1 if request.mtype == Type.CON else 0
            await self._commit(Message(topic, b"", qos, True, {}, None, client_id))
        return aiocoap.Message(code=Code.DELETED)

    # -- read --------------------------------------------------------------------

    def may_read(self, username: str | None, client_id: str, topic: str) -> bool:
        if not self.gate.can_subscribe(username, client_id, topic):
            return False
        check = self.broker.read_check
        return check is None or check(username, client_id, topic)

    def representation(self, msg: Message) -> Any:
        """A 2.05 response carrying ``msg``, in its content format, with its ETag."""
        resp = aiocoap.Message(code=Code.CONTENT, payload=msg.payload)
        cf = content_format_for(msg.properties.get("content_type"))
        if cf is not None:
            resp.opt.content_format = cf
        resp.opt.etag = etag_of(msg)
        return resp

    def get(self, request: Any, topic: str) -> Any:
        username, client_id = self.identity(request)
        if not self.may_read(username, client_id, topic):
            raise _Refusal(Code.FORBIDDEN, "not authorised")
        msg = self.current(topic)
        if msg is None:
            if self.created.get(topic, {}).get(PARAMS["initialize"]) is True:
                return aiocoap.Message(code=Code.CONTENT)  # created with "initialize"
            raise _Refusal(Code.NOT_FOUND, "no data published")
        tag = etag_of(msg)
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

    def conf(self, topic: str) -> dict[int, Any]:
        """The topic resource's representation: the draft's CBOR map (integer keys)."""
        out: dict[int, Any] = {
            PARAMS["topic-name"]: topic,
            PARAMS["topic-data"]: topic_href(DATA_PREFIX, topic),
            PARAMS["resource-type"]: RT_DATA,
        }
        out.update(self.created.get(topic, {}))
        msg = self.current(topic)
        cf = content_format_for(msg.properties.get("content_type")) if msg else None
        if cf is not None:
            out[PARAMS["topic-content-format"]] = cf
        return out

    def create(self, request: Any) -> tuple[str, dict[int, Any]]:
        """POST to the collection: validate a topic configuration, remember the topic."""
        username, client_id = self.identity(request)
        spec = _cbor_map(request.payload)
        for key in spec:
            if PARAM_NAMES[key] not in SETTABLE:
                raise _Refusal(Code.BAD_REQUEST, f"{PARAM_NAMES[key]} is not supported")
        name = spec.pop(PARAMS["topic-name"], None)
        if not isinstance(name, str):
            raise _Refusal(Code.BAD_REQUEST, 'expected a CBOR map with "topic-name"')
        if spec.pop(PARAMS["resource-type"], RT_DATA) != RT_DATA:
            raise _Refusal(Code.BAD_REQUEST, f'resource-type must be "{RT_DATA}"')
        cf = spec.get(PARAMS["topic-content-format"])
        if cf is not None and (not isinstance(cf, int) or isinstance(cf, bool)
                               or content_type_for(cf) is None):
            raise _Refusal(Code.BAD_REQUEST, "topic-content-format: unknown content format")
        if not isinstance(spec.get(PARAMS["topic-type"], ""), str):
            raise _Refusal(Code.BAD_REQUEST, "topic-type must be a text string")
        if not isinstance(spec.get(PARAMS["initialize"], False), bool):
            raise _Refusal(Code.BAD_REQUEST, "initialize must be a boolean")
        topic = self.topic_of(tuple(name.split("/")))
        if topic.startswith("$") or not (
            self.gate.can_publish(username, client_id, topic)
            or self.gate.can_subscribe(username, client_id, topic)
        ):
            raise _Refusal(Code.FORBIDDEN, "not authorised")
        if topic in self.known_topics():
            raise _Refusal(Code.BAD_REQUEST, "topic-name already in use")
        self.created[topic] = spec
        return topic, self.conf(topic)

    def matching(self, username: str | None, client_id: str,
                 wanted: dict[int, Any]) -> list[str]:
        """Readable topics whose representation has every (key, value) of ``wanted``."""
        out = []
        for topic in self.known_topics():
            if not self.may_read(username, client_id, topic):
                continue
            conf = self.conf(topic)
            if all(key in conf and conf[key] == value for key, value in wanted.items()):
                out.append(topic)
        return out

    # -- observe ---------------------------------------------------------------------

    async def observe(self, pipe: Any, cache: Any, topic: str) -> None:
        """GET with Observe: 0: an MQTT subscription whose deliveries become notifications."""
        request = pipe.request
        username, client_id = self.identity(request)
        if not self.may_read(username, client_id, topic):
            raise _Refusal(Code.FORBIDDEN, "not authorised")
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
                raise _Refusal(Code.BAD_REQUEST, "cannot subscribe")
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


def _guard(fn: Any) -> Any:
    """Turn _Refusal into its response."""

    async def wrapped(self: Any, request: Any) -> Any:
        try:
            return await fn(self, request)
        except _Refusal as exc:
            return _answer(exc.code, str(exc), exc.max_age)

    return wrapped


if aiocoap is not None:

    class TopicData(aiocoap.resource.Resource, aiocoap.resource.PathCapable):
        """``/ps/data/<topic>``: publish, read, observe, delete."""

        def __init__(self, core: CoapBroker) -> None:
            super().__init__()
            self.core = core

        async def render_to_pipe(self, pipe: Any) -> None:
            request = pipe.request
            try:
                if request.code == Code.GET and request.opt.observe == 0:
                    topic = self.core.topic_of(request.opt.uri_path)
                    await self.core.observe(pipe, self._block2, topic)
                    return
                if request.code in (Code.PUT, Code.POST):
                    too_large = self.core.check_size(request)
                    if too_large is not None:  # before assembling any more blocks
                        pipe.add_response(too_large, is_last=True)
                        return
            except _Refusal as exc:
                pipe.add_response(_answer(exc.code, str(exc), exc.max_age), is_last=True)
                return
            await aiocoap.interfaces.Resource._render_to_pipe(self, pipe)

        @_guard
        async def render_get(self, request: Any) -> Any:
            return self.core.get(request, self.core.topic_of(request.opt.uri_path))

        @_guard
        async def render_put(self, request: Any) -> Any:
            return await self.core.publish(request, self.core.topic_of(request.opt.uri_path),
                                           retain=True)

        @_guard
        async def render_post(self, request: Any) -> Any:
            return await self.core.publish(request, self.core.topic_of(request.opt.uri_path),
                                           retain=False)

        @_guard
        async def render_delete(self, request: Any) -> Any:
            return await self.core.delete(request, self.core.topic_of(request.opt.uri_path))

    class TopicConf(aiocoap.resource.Resource, aiocoap.resource.PathCapable):
        """``/ps/conf/<topic>``: the topic resource (configuration)."""

        def __init__(self, core: CoapBroker) -> None:
            super().__init__()
            self.core = core

        def _readable(self, request: Any) -> str:
            core = self.core
            topic = core.topic_of(request.opt.uri_path)
            username, client_id = core.identity(request)
            if not core.may_read(username, client_id, topic):
                raise _Refusal(Code.FORBIDDEN, "not authorised")
            if topic not in core.known_topics():
                raise _Refusal(Code.NOT_FOUND, "no such topic")
            return topic

        @_guard
        async def render_get(self, request: Any) -> Any:
            import cbor2

            conf = self.core.conf(self._readable(request))
            return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(conf),
                                   content_format=CONF_CONTENT_FORMAT)

        @_guard
        async def render_fetch(self, request: Any) -> Any:
            """Part of the topic resource: ``{conf-filter: [names or keys]}``."""
            import cbor2

            conf = self.core.conf(self._readable(request))
            wanted = _cbor_map(request.payload).get(PARAMS["conf-filter"])
            if not isinstance(wanted, list):
                raise _Refusal(Code.BAD_REQUEST, "expected a conf-filter array")
            keys = {PARAMS.get(k, -1) if isinstance(k, str) else k for k in wanted}
            part = {k: v for k, v in conf.items() if k in keys}
            return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(part),
                                   content_format=CONF_CONTENT_FORMAT)

        @_guard
        async def render_delete(self, request: Any) -> Any:
            core = self.core
            topic = core.topic_of(request.opt.uri_path)
            resp = await core.delete(request, topic)
            core.created.pop(topic, None)
            return resp

    class TopicCollection(aiocoap.resource.Resource):
        """``/ps``: list topics (GET), create a topic (POST)."""

        rt = RT_COLLECTION
        ct = "40"

        def __init__(self, core: CoapBroker) -> None:
            super().__init__()
            self.core = core

        @_guard
        async def render_get(self, request: Any) -> Any:
            """Links to the readable topic resources; with ``?rt=core.ps.data`` to their
            topic-data resources instead."""
            core = self.core
            username, client_id = core.identity(request)
            topics = core.matching(username, client_id, {})
            if f"rt={RT_DATA}" in request.opt.uri_query:
                links = [f'<{topic_href(DATA_PREFIX, t)}>;rt="{RT_DATA}";obs' for t in topics]
            else:
                links = [f'<{topic_href(CONF_PREFIX, t)}>;rt="{RT_CONF}"' for t in topics]
            return aiocoap.Message(code=Code.CONTENT, payload=",".join(links).encode(),
                                   content_format=40)

        @_guard
        async def render_fetch(self, request: Any) -> Any:
            """Topics by properties: links to the topics whose representation contains
            every parameter of the CBOR map in the request."""
            core = self.core
            username, client_id = core.identity(request)
            wanted = _cbor_map(request.payload)
            links = [f'<{topic_href(CONF_PREFIX, t)}>;rt="{RT_CONF}"'
                     for t in core.matching(username, client_id, wanted)]
            return aiocoap.Message(code=Code.CONTENT, payload=",".join(links).encode(),
                                   content_format=40)

        @_guard
        async def render_post(self, request: Any) -> Any:
            import cbor2

            topic, conf = self.core.create(request)
            resp = aiocoap.Message(code=Code.CREATED, payload=cbor2.dumps(conf),
                                   content_format=CONF_CONTENT_FORMAT)
            resp.opt.location_path = (*CONF_PREFIX, *topic.split("/"))
            return resp


    class PubSubSite(aiocoap.resource.Site):
        """The resource tree; answers 4.02 Bad Option to unrecognised critical options
        (RFC 7252 §5.4.1), which aiocoap's Site would otherwise ignore."""

        def __init__(self, data: TopicData, conf: TopicConf) -> None:
            super().__init__()
            self.subtrees: dict[str, Any] = {DATA_PREFIX[1]: data, CONF_PREFIX[1]: conf}
            self.add_resource(list(DATA_PREFIX), data)
            self.add_resource(list(CONF_PREFIX), conf)

        async def render_to_pipe(self, pipe: Any) -> None:
            request = pipe.request
            for opt in request.opt.option_list():
                number = int(opt.number)
                if number & 1 and number not in HANDLED_OPTIONS:
                    pipe.add_response(_answer(Code.BAD_OPTION, f"option {number}"),
                                      is_last=True)
                    return
            path = request.opt.uri_path
            if len(path) > 2 and path[0] == "ps" and request.opt.uri_path_abbrev is None:
                sub = self.subtrees.get(path[1])
                if sub is not None:
                    # the Site would deep-copy the request to strip the path: a fifth of
                    # the CPU time of a publication; strip it in place instead
                    request.opt.uri_path = path[2:]
                    await sub.render_to_pipe(pipe)
                    return
            await super().render_to_pipe(pipe)


class CoapServer:
    """The CoAP listeners of a gateway (one aiocoap context per ``coap.listen`` URL)."""

    def __init__(self, broker: Broker, gate: Gatekeeper, settings: CoapSettings) -> None:
        if aiocoap is None:
            raise RuntimeError("CoAP needs the aiocoap package (pip install 'rapidmq-edge[coap]')")
        self.settings = settings
        self.core = CoapBroker(broker, gate, settings)
        # A response not ready within EMPTY_ACK_DELAY (aiocoap: 0.1 s) is sent as an empty
        # ACK plus a separate CON response: twice the datagrams, when a busy store makes
        # commits slow. 1 s still stays well below the client's ACK_TIMEOUT (2-3 s).
        from aiocoap.numbers.constants import TransportTuning

        TransportTuning.EMPTY_ACK_DELAY = max(TransportTuning.EMPTY_ACK_DELAY, 1.0)
        if not log.isEnabledFor(logging.DEBUG):
            # aiocoap logs every block-wise step and client error at INFO: per request
            for name in ("coap-server", "coap"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self.contexts: list[Any] = []
        self.endpoints: list[Any] = []  # coap.endpoint.UdpEndpoint, one per listen URL
        self.fast: list[Any] = []  # coap_fast.FastPublisher of each endpoint
        self.bound: list[str] = []

    def site(self) -> Any:
        """The resource tree (wrapped for OSCORE when ``oscore_dir`` is set)."""
        site = PubSubSite(TopicData(self.core), TopicConf(self.core))
        site.add_resource([".well-known", "core"], aiocoap.resource.WKCResource(
            site.get_resources_as_linkheader, impl_info=None))
        site.add_resource(["ps"], TopicCollection(self.core))
        if self.settings.oscore_dir is None:
            return site
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        creds, self.core.oscore_names = load_contexts(self.settings.oscore_dir)
        return OscoreSiteWrapper(site, creds)

    async def start(self) -> list[str]:
        """Bind every endpoint (UDP only); return their URLs.

        Each endpoint's socket is a :class:`~rapidmq_edge.coap.endpoint.UdpEndpoint`:
        plain publications take the fast path (:mod:`.coap_fast`, not when OSCORE is
        required), every other message goes to aiocoap serving :meth:`site`.
        """
        from ..coap.endpoint import open_endpoint
        from .coap_fast import FastPublisher

        site = self.site()
        for ep in self.settings.listen:
            endpoint, ctx = await open_endpoint(ep.host, ep.port, site)
            if not self.settings.require_oscore:
                fast = FastPublisher(self.core.broker, self.core.gate, self.settings,
                                     endpoint, content_type_for, _is_text)
                endpoint.fast = fast
                self.fast.append(fast)
            self.endpoints.append(endpoint)
            self.contexts.append(ctx)
            url = f"coap://{ep.host}:{ep.port}" if ":" not in ep.host else (
                f"coap://[{ep.host}]:{ep.port}")
            self.bound.append(url)
            log.info("CoAP listening on %s", url)
        return self.bound

    async def close(self) -> None:
        """Stop serving and end every observation."""
        self.core.close_observers()
        for ctx in self.contexts:
            with contextlib.suppress(Exception):
                await ctx.shutdown()
        self.contexts.clear()


__all__ = [
    "CoapServer",
    "CoapBroker",
    "provision_device",
    "content_type_for",
    "content_format_for",
]
