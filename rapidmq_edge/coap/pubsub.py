"""The CoAP publish-subscribe vocabulary (draft-ietf-core-coap-pubsub), sans-I/O.

Pure functions used by the CoAP ingress (:mod:`rapidmq_edge.ingress.coap_server`) and its fast
path: the topic parameters (the draft's CBOR keys) and the validation of a topic
configuration, the topic resource's representation and its ``conf-filter`` part, the
link-format listings of the topic collection, the ETag of a topic's value and the
translation between CoAP Content-Format numbers and MQTT 5 ``content_type`` (aiocoap's
content-format registry, which is data only). Invalid parameters raise
:class:`ParameterError`, answered 4.00 Bad Request with its message.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

from aiocoap.numbers.contentformat import ContentFormat

__all__ = [
    "CONF_CONTENT_FORMAT",
    "CONF_PREFIX",
    "DATA_PREFIX",
    "PARAMS",
    "PARAM_NAMES",
    "RT_COLLECTION",
    "RT_CONF",
    "RT_DATA",
    "SETTABLE",
    "ParameterError",
    "conf_part",
    "conf_representation",
    "content_format_for",
    "content_type_for",
    "etag_of",
    "has_all",
    "is_text",
    "links",
    "parse_parameters",
    "topic_configuration",
    "topic_href",
]

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
DATA_PREFIX = ("ps", "data")
CONF_PREFIX = ("ps", "conf")


class Refusal(Exception):
    """A request answered with an error ``code``, a diagnostic payload (``why``) and the
    options telling the client when to retry (Max-Age, s) or how much fits (Size1, bytes)."""

    def __init__(self, code: int, why: str, max_age: int | None = None,
                 size1: int | None = None) -> None:
        super().__init__(why)
        self.code = code
        self.max_age = max_age
        self.size1 = size1


class ParameterError(ValueError):
    """Invalid topic parameters in a request (answered 4.00 with this message)."""


def _show(value: Any, limit: int = 40) -> str:
    """``repr`` of a client's value for a diagnostic, bounded (a CBOR integer can be too
    large for ``repr``: Python's 4300-digit limit raises ValueError)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


def is_text(content_type: str) -> bool:
    """True for text content types (their payload must be UTF-8)."""
    return content_type.startswith(_TEXT_TYPES)


# --------------------------------------------------------------------------- resources


def topic_href(prefix: tuple[str, ...], topic: str) -> str:
    """The URI path of a topic resource: every MQTT level is one percent-encoded segment."""
    return "/" + "/".join(prefix) + "/" + "/".join(quote(s, safe="") for s in topic.split("/"))


def links(topics: list[str], data: bool = False) -> bytes:
    """A link-format listing (RFC 6690) of topic resources, or with ``data`` of their
    topic-data resources (observable)."""
    if data:
        out = [f'<{topic_href(DATA_PREFIX, t)}>;rt="{RT_DATA}";obs' for t in topics]
    else:
        out = [f'<{topic_href(CONF_PREFIX, t)}>;rt="{RT_CONF}"' for t in topics]
    return ",".join(out).encode()


def etag_of(payload: bytes, content_type: str | None) -> bytes:
    """The ETag of a topic's current value (RFC 7252 §5.10.6): 8 bytes of a hash of its
    payload and content type, so equal representations have equal tags."""
    h = hashlib.blake2b(payload, digest_size=8)
    h.update(b"\0" + str(content_type or "").encode())
    return h.digest()


# --------------------------------------------------------------------------- topic parameters


def parse_parameters(payload: bytes) -> dict[int, Any]:
    """A pubsub parameter map (integer or name keys) with integer keys."""
    import cbor2

    try:
        spec = cbor2.loads(payload) if payload else None
    except Exception:  # noqa: BLE001 - any decoding problem is the client's
        spec = None
    if not isinstance(spec, dict):
        raise ParameterError("expected a CBOR map of topic parameters")
    out: dict[int, Any] = {}
    for key, value in spec.items():
        number = PARAMS.get(key) if isinstance(key, str) else key
        if not isinstance(number, int) or isinstance(number, bool) or number not in PARAM_NAMES:
            raise ParameterError(f"unknown topic parameter {_show(key)}")
        out[number] = value
    return out


def topic_configuration(spec: dict[int, Any]) -> tuple[str, dict[int, Any]]:
    """Validate the topic configuration of a create request (POST to the collection):
    (topic-name, the optional parameters to remember). ``spec`` is consumed."""
    for key in spec:
        if PARAM_NAMES[key] not in SETTABLE:
            raise ParameterError(f"{PARAM_NAMES[key]} is not supported")
    name = spec.pop(PARAMS["topic-name"], None)
    if not isinstance(name, str):
        raise ParameterError('expected a CBOR map with "topic-name"')
    if spec.pop(PARAMS["resource-type"], RT_DATA) != RT_DATA:
        raise ParameterError(f'resource-type must be "{RT_DATA}"')
    cf = spec.get(PARAMS["topic-content-format"])
    if cf is not None and (not isinstance(cf, int) or isinstance(cf, bool)
                           or content_type_for(cf) is None):
        raise ParameterError("topic-content-format: unknown content format")
    if not isinstance(spec.get(PARAMS["topic-type"], ""), str):
        raise ParameterError("topic-type must be a text string")
    if not isinstance(spec.get(PARAMS["initialize"], False), bool):
        raise ParameterError("initialize must be a boolean")
    return name, spec


def conf_representation(topic: str, params: dict[int, Any],
                        content_format: int | None) -> dict[int, Any]:
    """The topic resource's representation: the draft's CBOR map (integer keys), with the
    parameters it was created with and the content format of its current value."""
    out: dict[int, Any] = {
        PARAMS["topic-name"]: topic,
        PARAMS["topic-data"]: topic_href(DATA_PREFIX, topic),
        PARAMS["resource-type"]: RT_DATA,
    }
    out.update(params)
    if content_format is not None:
        out[PARAMS["topic-content-format"]] = content_format
    return out


def conf_part(conf: dict[int, Any], request: dict[int, Any]) -> dict[int, Any]:
    """FETCH of a topic resource: the parameters the request's ``conf-filter`` (names or
    keys) selects."""
    wanted = request.get(PARAMS["conf-filter"])
    if not isinstance(wanted, list):
        raise ParameterError("expected a conf-filter array")
    if not all(isinstance(k, str | int) for k in wanted):
        raise ParameterError("conf-filter: expected parameter names or keys")
    keys = {PARAMS.get(k, -1) if isinstance(k, str) else k for k in wanted}
    return {k: v for k, v in conf.items() if k in keys}


def has_all(conf: dict[int, Any], wanted: dict[int, Any]) -> bool:
    """True when the representation ``conf`` contains every (key, value) of ``wanted``."""
    return all(key in conf and conf[key] == value for key, value in wanted.items())
