"""The CoAP publish fast path: PUT/POST to ``/ps/data/<topic>`` without aiocoap.

Taken here (see :mod:`.coap_udp` for why): CON or NON requests with code
PUT or POST, a ``/ps/data/...`` Uri-Path and no options besides Uri-Host, Uri-Port,
Uri-Path and Content-Format, when OSCORE is not required. Anything else (Block1, OSCORE,
If-Match/If-None-Match, Size1, queries, unknown options) goes to aiocoap, whose resources
implement the same semantics (:class:`~rapidmq_edge.ingress.coap_broker.CoapBroker`).

Per request: deduplication by (remote, message id) with the response cached for
retransmissions (RFC 7252 §4.5); the same checks and answers as the aiocoap resources
(ACL as an anonymous client, topic name, size, Content-Format, UTF-8 text); the message is
published to the broker and the response (piggybacked on the ACK for CON, a NON for NON)
is sent from the broker's commit future callback: only after the durable group commit.
PUT to a topic without data answers 2.01 Created, later ones 2.04 (draft-ietf-core-coap-pubsub
§ Publish); POST (an event, not retained) answers 2.04. Load shedding: while
``max_pending`` publications await their commit, new ones get 4.29 Too Many Requests with
Max-Age = ``retry_after`` (RFC 8516); a publication refused by the store (queue full)
gets 5.03 with the same Max-Age.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ..broker.broker import Broker
from ..broker.message import Message, PublishRefused
from ..broker.policy import AccessPolicy
from ..coap import codec
from ..coap.dedup import Deduplicator
from ..coap.pubsub import Refusal
from ..config.ingress import CoapSettings
from ..mqtt.topics import valid_topic_name
from .coap_udp import UdpEndpoint

log = logging.getLogger(__name__)

#: options the fast path understands; any other sends the request to aiocoap
FAST_OPTIONS = frozenset({codec.URI_HOST, codec.URI_PORT, codec.URI_PATH, codec.CONTENT_FORMAT})
_PS, _DATA = b"ps", b"data"


class FastPublisher:
    """The fast-path handler of a :class:`UdpEndpoint` (call it with each parsed message)."""

    def __init__(
        self, broker: Broker, access: AccessPolicy, settings: CoapSettings, endpoint: UdpEndpoint,
        content_type_for: Callable[[int], str | None], is_text: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.access = access
        self.settings = settings
        self.endpoint = endpoint
        self.clock = clock
        self.dedup = Deduplicator(settings.dedup_entries)
        self.max_age = codec.encode_uint(settings.retry_after)
        self.pending = 0
        #: publications handed to the broker, by QoS (the ``protocol="coap"`` series)
        self.published_by_qos = [0, 0, 0]
        self.published = self.refused = self.shed = self.duplicates = 0
        self._next_expiry = 0.0
        self._mid = secrets.randbelow(0x10000)
        # content-format number -> (MQTT content_type, is text), or None when unknown
        self._formats: dict[int, tuple[str, bool] | None] = {}
        self._content_type_for = content_type_for
        self._is_text = is_text
        self._hostinfo: dict[Any, str] = {}

    # -- dispatch ------------------------------------------------------------------

    def __call__(self, msg: codec.Message, addr: Any) -> bool:
        """Handle ``msg`` when it is a plain publication; False leaves it to aiocoap."""
        code = msg.code
        if (code != codec.PUT and code != codec.POST) or msg.mtype > codec.NON:
            return False
        path: list[bytes] = []
        cf: bytes | None = None
        for number, value in msg.options:
            if number == codec.URI_PATH:
                path.append(value)
            elif number == codec.CONTENT_FORMAT:
                cf = value
            elif number not in FAST_OPTIONS:
                return False
        if len(path) < 3 or path[0] != _PS or path[1] != _DATA:
            return False
        now = self.clock()
        if now >= self._next_expiry:
            self.dedup.expire(now)
            self._next_expiry = now + 1.0
        cached = self.dedup.check(addr, msg.mid, now)
        if cached is not None:
            self.duplicates += 1
            if cached:  # else the first copy is still being committed: its answer follows
                self.endpoint.sendto(cached, addr)
            return True
        try:
            self._publish(msg, addr, path, cf)
        except Refusal as exc:
            self.refused += 1
            self._answer(msg, addr, exc.code, _options(exc), str(exc).encode())
        return True

    # -- publishing ------------------------------------------------------------------

    def _publish(self, msg: codec.Message, addr: Any, path: list[bytes], cf: bytes | None) -> None:
        try:
            topic = "/".join([seg.decode("utf-8") for seg in path[2:]])
        except UnicodeDecodeError:
            raise Refusal(codec.BAD_REQUEST, "invalid topic") from None
        if not valid_topic_name(topic):
            raise Refusal(codec.BAD_REQUEST, "invalid topic")
        client_id = self._client_id(addr)
        if topic.startswith("$") or not self.access.can_publish(None, client_id, topic):
            log.info("CoAP client %s not authorised to publish to %s", client_id, topic)
            raise Refusal(codec.FORBIDDEN, "not authorised")
        payload = msg.payload
        limit = self.settings.max_payload
        if len(payload) > limit:
            raise Refusal(codec.REQUEST_ENTITY_TOO_LARGE, f"payload over {limit} bytes",
                          size1=limit)
        props: dict[str, Any] = {}
        if cf is not None:
            fmt = self._format(codec.decode_uint(cf))
            if fmt is None:
                raise Refusal(codec.UNSUPPORTED_CONTENT_FORMAT,
                              f"content-format {codec.decode_uint(cf)}")
            props["content_type"] = fmt[0]
            if fmt[1]:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise Refusal(codec.BAD_REQUEST, "payload is not UTF-8") from None
                props["payload_format_indicator"] = 1
        retain = msg.code == codec.PUT
        if retain and not payload:
            raise Refusal(codec.BAD_REQUEST, "empty payload (use DELETE to clear)")
        if self.pending >= self.settings.max_pending:
            self.shed += 1
            raise Refusal(codec.TOO_MANY_REQUESTS, "too many publications in flight",
                          self.settings.retry_after)
        ok = codec.CREATED if retain and topic not in self.broker.retained else codec.CHANGED
        qos = 1 if msg.mtype == codec.CON else 0
        broker = self.broker
        pub = Message(topic, payload, qos, retain, props, None, client_id)
        self.published_by_qos[qos] += 1
        try:
            broker.publish(pub)
        except PublishRefused as exc:
            raise Refusal(codec.SERVICE_UNAVAILABLE, str(exc) or "refused",
                          self.settings.retry_after) from None
        fut = broker.commit_future()
        if fut is None:
            self.published += 1
            self._answer(msg, addr, ok)
            return
        self.pending += 1
        fut.add_done_callback(lambda f: self._committed(f, msg, addr, ok, pub))

    def _committed(self, fut: asyncio.Future[Any], msg: codec.Message, addr: Any, ok: int,
                   pub: Message) -> None:
        self.pending -= 1
        topic = pub.topic
        exc = pub.refused or (None if fut.cancelled() else fut.exception())
        if fut.cancelled() or exc is not None:
            log.warning("CoAP publication to %s not stored: %s", topic, exc or "cancelled")
            self.refused += 1
            self._answer(msg, addr, codec.SERVICE_UNAVAILABLE, ((codec.MAX_AGE, self.max_age),),
                         f"not stored: {exc}".encode())
            return
        self.published += 1
        self._answer(msg, addr, ok)

    # -- helpers ---------------------------------------------------------------------

    def _answer(self, msg: codec.Message, addr: Any, code: int,
                options: tuple[tuple[int, bytes], ...] = (), payload: bytes = b"") -> None:
        mid = None
        if msg.mtype == codec.NON:
            self._mid = mid = (self._mid + 1) & 0xFFFF
        data = codec.response(msg, code, options, payload, mid)
        self.dedup.answer(addr, msg.mid, data)
        self.endpoint.sendto(data, addr)

    def _format(self, number: int) -> tuple[str, bool] | None:
        try:
            return self._formats[number]
        except KeyError:
            pass
        ct = self._content_type_for(number) if number <= 0xFFFF else None
        fmt = (ct, self._is_text(ct)) if ct is not None else None
        if len(self._formats) < 1024:
            self._formats[number] = fmt
        return fmt

    def _client_id(self, addr: Any) -> str:
        """``coap:<host:port>`` like aiocoap's ``remote.hostinfo`` (port 5683 omitted)."""
        cid = self._hostinfo.get(addr)
        if cid is None:
            host, port = addr[0], addr[1]
            if ":" in host:
                host = f"[{host}]"
            cid = f"coap:{host}" if port == 5683 else f"coap:{host}:{port}"
            if len(self._hostinfo) >= 65536:
                self._hostinfo.clear()
            self._hostinfo[addr] = cid
        return cid


def _options(refusal: Refusal) -> tuple[tuple[int, bytes], ...]:
    """The CoAP options of a refusal's answer."""
    out: list[tuple[int, bytes]] = []
    if refusal.max_age is not None:
        out.append((codec.MAX_AGE, codec.encode_uint(refusal.max_age)))
    if refusal.size1 is not None:
        out.append((codec.SIZE1, codec.encode_uint(refusal.size1)))
    return tuple(out)
