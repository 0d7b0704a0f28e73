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
the listener's socket is a :class:`~rapidmq_edge.ingress.coap_udp.UdpEndpoint` whose fast path
(:mod:`.coap_fast`) publishes them with the same checks and answers, and sheds load with
4.29 + Max-Age; everything else is served by the aiocoap resources below through the same
socket.

Content-Format and the MQTT 5 ``content_type`` property are translated both ways;
text formats (text/plain, JSON, ...) also set ``payload_format_indicator`` = 1.

Security: the MQTT ACL applies. Anonymous CoAP clients are user ``None``; requests
protected with OSCORE (RFC 8613) are the user named like their security context
(a sub-directory of ``coap.oscore_dir``, see :func:`provision_device`).

This module is the aiocoap resource tree and the listeners (:class:`CoapServer`); what
the resources do is :class:`~rapidmq_edge.ingress.coap_broker.CoapBroker`, and the pure
pubsub vocabulary (topic parameters, representations, link-format, ETags, content
formats) is :mod:`rapidmq_edge.coap.pubsub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..broker.broker import Broker
from ..broker.policy import AccessPolicy
from ..config.ingress import CoapSettings
from ..security.oscore import LiveContexts, provision_device

try:  # optional dependency: the gateway runs without CoAP when it is missing
    import aiocoap
    import aiocoap.interfaces
    import aiocoap.resource
    from aiocoap.numbers.codes import Code

    from ..coap.pubsub import (
        CONF_CONTENT_FORMAT,
        CONF_PREFIX,
        DATA_PREFIX,
        RT_COLLECTION,
        RT_DATA,
        ParameterError,
        Refusal,
        conf_part,
        content_format_for,
        content_type_for,
        is_text,
        links,
        parse_parameters,
    )
    from .coap_broker import CoapBroker, _answer
except ImportError:  # pragma: no cover - exercised only without the extra installed
    aiocoap = None

log = logging.getLogger(__name__)
#: how often a running server looks for OSCORE contexts added or removed (s)
OSCORE_SYNC_S = 2.0

#: critical options understood here (or by aiocoap below the resources): If-Match,
#: Uri-Host, If-None-Match, Uri-Port, Uri-Path, Uri-Path-Abbrev, Uri-Query, Accept,
#: Block2, Block1
HANDLED_OPTIONS = frozenset({1, 3, 5, 7, 11, 13, 15, 17, 23, 27})


def _guard(fn: Any) -> Any:
    """Turn Refusal into its response, invalid topic parameters into 4.00."""

    async def wrapped(self: Any, request: Any) -> Any:
        try:
            return await fn(self, request)
        except Refusal as exc:
            return _answer(exc.code, str(exc), exc.max_age)
        except ParameterError as exc:
            return _answer(Code.BAD_REQUEST, str(exc))

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
            except Refusal as exc:
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

        def _readable(self, request: Any) -> tuple[str, str]:
            """(the broker's topic, the client's name of it)"""
            core = self.core
            name = core.topic_of(request.opt.uri_path)
            username, client_id = core.identity(request)
            topic = core.broker_topic(username, name)
            if not core.may_read(username, client_id, topic):
                raise Refusal(Code.FORBIDDEN, "not authorised")
            if topic not in core.known_topics():
                raise Refusal(Code.NOT_FOUND, "no such topic")
            return topic, name

        @_guard
        async def render_get(self, request: Any) -> Any:
            import cbor2

            conf = self.core.conf(*self._readable(request))
            return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(conf),
                                   content_format=CONF_CONTENT_FORMAT)

        @_guard
        async def render_fetch(self, request: Any) -> Any:
            """Part of the topic resource: ``{conf-filter: [names or keys]}``."""
            import cbor2

            conf = self.core.conf(*self._readable(request))
            part = conf_part(conf, parse_parameters(request.payload))
            return aiocoap.Message(code=Code.CONTENT, payload=cbor2.dumps(part),
                                   content_format=CONF_CONTENT_FORMAT)

        @_guard
        async def render_delete(self, request: Any) -> Any:
            core = self.core
            topic = core.topic_of(request.opt.uri_path)
            resp = await core.delete(request, topic)
            core.created.pop(core.broker_topic(core.identity(request)[0], topic), None)
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
            data = f"rt={RT_DATA}" in request.opt.uri_query
            return aiocoap.Message(code=Code.CONTENT, payload=links(topics, data),
                                   content_format=40)

        @_guard
        async def render_fetch(self, request: Any) -> Any:
            """Topics by properties: links to the topics whose representation contains
            every parameter of the CBOR map in the request."""
            core = self.core
            username, client_id = core.identity(request)
            wanted = parse_parameters(request.payload)
            topics = core.matching(username, client_id, wanted)
            return aiocoap.Message(code=Code.CONTENT, payload=links(topics),
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

    def __init__(self, broker: Broker, access: AccessPolicy, settings: CoapSettings) -> None:
        if aiocoap is None:
            raise RuntimeError("CoAP needs the aiocoap package (pip install 'rapidmq-edge[coap]')")
        self.settings = settings
        self.core = CoapBroker(broker, access, settings)
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
        #: the OSCORE contexts served (``coap.oscore_dir`` set), kept equal to the directory
        self.oscore: LiveContexts | None = None
        self._follow: asyncio.Task[None] | None = None
        self.endpoints: list[Any] = []  # coap_udp.UdpEndpoint, one per listen URL
        self.fast: list[Any] = []  # coap_fast.FastPublisher of each endpoint
        self.bound: list[str] = []

    def published_by_qos(self) -> list[int]:
        """Publications handed to the broker by QoS, over both paths (aiocoap's, the fast
        one)."""
        out = list(self.core.published_by_qos)
        for fast in self.fast:
            out = [a + b for a, b in zip(out, fast.published_by_qos, strict=True)]
        return out

    def site(self) -> Any:
        """The resource tree (wrapped for OSCORE when ``oscore_dir`` is set)."""
        site = PubSubSite(TopicData(self.core), TopicConf(self.core))
        site.add_resource([".well-known", "core"], aiocoap.resource.WKCResource(
            site.get_resources_as_linkheader, impl_info=None))
        site.add_resource(["ps"], TopicCollection(self.core))
        if self.settings.oscore_dir is None:
            return site
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        self.oscore = LiveContexts(self.settings.oscore_dir)
        self.core.oscore_names = self.oscore.names
        return OscoreSiteWrapper(site, self.oscore.creds)  # the same map: sync() edits it

    def sync_oscore(self) -> None:
        """Serve the devices provisioned since, stop serving the removed ones (at once after
        an erasure; every :data:`OSCORE_SYNC_S` otherwise)."""
        if self.oscore is None:
            return
        added, removed = self.oscore.sync()
        for name in added:
            log.info("OSCORE: serving device %s (its context appeared in %s)", name,
                     self.oscore.dir)
        for name in removed:
            log.info("OSCORE: device %s no longer served (its context is gone)", name)

    async def _follow_oscore(self) -> None:
        while True:
            await asyncio.sleep(OSCORE_SYNC_S)
            try:
                self.sync_oscore()
            except Exception:  # pragma: no cover - keep following
                log.exception("OSCORE contexts")

    async def start(self) -> list[str]:
        """Bind every endpoint (UDP only); return their URLs.

        Each endpoint's socket is a :class:`~rapidmq_edge.ingress.coap_udp.UdpEndpoint`:
        plain publications take the fast path (:mod:`.coap_fast`, not when OSCORE is
        required), every other message goes to aiocoap serving :meth:`site`.
        """
        from .coap_fast import FastPublisher
        from .coap_udp import open_endpoint

        site = self.site()
        for i, ep in enumerate(self.settings.listen):
            try:
                endpoint, ctx = await open_endpoint(ep.host, ep.port, site)
            except OSError as exc:
                raise OSError(f"coap.listen[{i}] {ep.url}: {exc.strerror or exc}") from exc
            if not self.settings.require_oscore:
                fast = FastPublisher(self.core.broker, self.core.access, self.settings,
                                     endpoint, content_type_for, is_text)
                endpoint.fast = fast
                self.fast.append(fast)
            self.endpoints.append(endpoint)
            self.contexts.append(ctx)
            url = f"coap://{ep.host}:{ep.port}" if ":" not in ep.host else (
                f"coap://[{ep.host}]:{ep.port}")
            self.bound.append(url)
            log.info("CoAP listening on %s", url)
        if self.oscore is not None:
            self._follow = asyncio.get_running_loop().create_task(self._follow_oscore())
        return self.bound

    async def close(self) -> None:
        """Stop serving and end every observation."""
        if self._follow is not None:
            self._follow.cancel()
            await asyncio.gather(self._follow, return_exceptions=True)
            self._follow = None
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
