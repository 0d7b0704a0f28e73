"""The HTTP API (aiohttp): publish, subscribe as Server-Sent Events, health.

* ``POST /api/v1/publish``   publish one message, answered once it is durably committed
* ``GET  /api/v1/subscribe`` an SSE stream of the messages matching ``?filter=``
* ``GET  /api/v1/health``    gateway id, uptime, clients, forwarding summary (no token)
* ``POST /api/v1/incidents/{id}`` an operator's verdict on an incident (admin token;
                             :mod:`.incidents_http`), when the gateway gives a hook
* ``POST /api/v1/erase``     erase what is held about a device (admin token;
                             :mod:`.erase_http`), when the gateway gives a hook
* ``/dashboard``             the live dashboard, when the gateway gives it a snapshot
                             (:mod:`.dashboard`)

Everything but health needs ``Authorization: Bearer <token>`` (see
:mod:`rapidmq_edge.security.tokens`); the token's user is what the ACL sees (a ``read``
token may not publish). Requests go through the broker exactly like an MQTT client's: same
ACL checks, same taps (the store-and-forward queue), same retained messages. The API is described in
``docs/http-api.yaml`` (OpenAPI 3.1).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..broker.broker import Broker
from ..broker.client_certificate import certificate_cn
from ..broker.local import LocalClient
from ..broker.message import Message, PublishRefused
from ..broker.policy import AccessPolicy
from ..config.ingress import HttpSettings
from ..mqtt.mountpoint import TenantMount
from ..mqtt.topics import valid_subscription_filter, valid_topic_name
from ..security.tokens import Token, TokenDB, TokensFileError
from ..telemetry import RepeatedLog
from .erase_http import EraseHook, add_erase_routes
from .incidents_http import VerdictHook, add_incident_routes
from .ops_http import OpsHooks, add_ops_routes

log = logging.getLogger(__name__)

API = "/api/v1"
#: seconds between SSE heartbeat comments
HEARTBEAT = 15.0
#: per-stream buffer bounds; beyond them messages are dropped (and counted), never waited for
STREAM_MAX_MESSAGES = 1000
STREAM_MAX_BYTES = 8 * 1024 * 1024
#: Retry-After (seconds) when the store-and-forward queue refuses a message
RETRY_AFTER = 5
#: how often an idle stream checks that its client is still there
_POLL = 1.0

Snapshot = Callable[[], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"ok": False, "error": message}, status=status, headers=headers
    )


class _BadRequest(Exception):
    """A request body that is not a valid publish request; the message says why."""


#: the longest MQTT UTF-8 string (a 2-byte length prefix), e.g. a content type
_MAX_MQTT_STRING = 65535


def _mqtt_string(text: str) -> bool:
    """True when ``text`` is a valid MQTT UTF-8 string: encodable (JSON's ``\\ud800``
    escapes give lone surrogates, which are not), no U+0000, at most 65,535 bytes."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(raw) <= _MAX_MQTT_STRING and b"\x00" not in raw


def _publish_fields(data: Any) -> tuple[str, bytes, int, bool, dict[str, Any]]:
    """Validate a publish request body: (topic, payload, qos, retain, properties)."""
    if not isinstance(data, dict):
        raise _BadRequest("body must be a JSON object")
    known = {"topic", "payload", "encoding", "qos", "retain", "content_type", "user_properties"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _BadRequest(f"unknown field: {unknown[0]}")
    topic = data.get("topic")
    if not isinstance(topic, str):
        raise _BadRequest("topic: required, must be a string")
    if not _mqtt_string(topic) or not valid_topic_name(topic):
        raise _BadRequest("topic: not a valid MQTT topic name (empty, wildcard or too long)")
    payload = data.get("payload")
    if not isinstance(payload, str):
        raise _BadRequest("payload: required, must be a string")
    encoding = data.get("encoding", "utf-8")
    if encoding == "utf-8":
        try:
            raw = payload.encode("utf-8")
        except UnicodeEncodeError:
            raise _BadRequest("payload: not encodable as UTF-8") from None
    elif encoding == "base64":
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise _BadRequest("payload: invalid base64") from None
    else:
        raise _BadRequest('encoding: must be "utf-8" or "base64"')
    qos = data.get("qos", 1)
    if type(qos) is not int or qos not in (0, 1):  # not a bool, nor 1.0
        raise _BadRequest("qos: must be 0 or 1")
    retain = data.get("retain", False)
    if not isinstance(retain, bool):
        raise _BadRequest("retain: must be true or false")
    props: dict[str, Any] = {}
    ctype = data.get("content_type")
    if ctype is not None:
        if not isinstance(ctype, str) or not _mqtt_string(ctype):
            raise _BadRequest("content_type: must be a string")
        props["content_type"] = ctype
    ups = data.get("user_properties")
    if ups is not None:
        if not isinstance(ups, dict) or not all(isinstance(v, str) for v in ups.values()):
            raise _BadRequest("user_properties: must be an object of string values")
        if any("\x00" in k or "\x00" in v for k, v in ups.items()):
            raise _BadRequest("user_properties: NUL characters are not allowed")
        if not all(_mqtt_string(k) and _mqtt_string(v) for k, v in ups.items()):
            raise _BadRequest("user_properties: names and values must be UTF-8 text of at "
                              f"most {_MAX_MQTT_STRING} bytes")
        if ups:
            props["user_property"] = list(ups.items())
    return topic, raw, qos, retain, props


def _event(msg: Message, retained: bool, topic: str | None = None) -> bytes:
    """One SSE ``message`` event (``topic``: the client's name of it, below a mountpoint)."""
    try:
        payload = msg.payload.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        payload = base64.b64encode(msg.payload).decode("ascii")
        encoding = "base64"
    body: dict[str, Any] = {
        "topic": msg.topic if topic is None else topic,
        "payload": payload,
        "encoding": encoding,
        "qos": msg.qos,
        "retain": retained,
        "content_type": msg.properties.get("content_type"),
    }
    ups = msg.properties.get("user_property")
    if ups:
        body["user_properties"] = dict(ups)
    # json.dumps escapes newlines, so the data fits on one line as SSE requires
    return b"event: message\ndata: " + json.dumps(body).encode() + b"\n\n"


class _Stream:
    """The bounded buffer between a LocalClient (broker side) and one SSE response."""

    def __init__(self, mount: TenantMount | None = None, filt: str = "") -> None:
        #: a tenant token's mountpoint: events name topics below it (and ``filt`` is the
        #: mounted filter, for the $ topics only a mounted wildcard matches)
        self.mount = mount
        self.filter = filt
        self.buffer: deque[bytes] = deque()
        self.bytes = 0
        self.dropped = 0
        self.reported = 0
        self.wake = asyncio.Event()

    def push(self, msg: Message, retained: bool) -> None:
        """Called by the broker: never blocks, drops when the client is too slow."""
        topic = None
        if self.mount is not None:
            topic = self.mount.outbound(msg.topic)
            if topic is None or (topic[0] == "$" and not self.mount.matched_by(
                    topic, (self.filter,))):
                return
        if len(self.buffer) >= STREAM_MAX_MESSAGES or self.bytes >= STREAM_MAX_BYTES:
            self.dropped += 1
            return
        ev = _event(msg, retained, topic)
        self.buffer.append(ev)
        self.bytes += len(ev)
        self.wake.set()

    def take(self) -> list[bytes]:
        out = list(self.buffer)
        self.buffer.clear()
        self.bytes = 0
        return out


class HttpApi:
    """The aiohttp application and its listeners."""

    def __init__(
        self, broker: Broker, access: AccessPolicy, settings: HttpSettings, snapshot: Snapshot,
        ops: OpsHooks | None = None, dashboard: Snapshot | None = None,
    ) -> None:
        self.broker = broker
        #: verdicts on incidents (:mod:`.incidents_http`); set before :meth:`start`
        self.verdicts: VerdictHook | None = None
        #: erasure of a device (:mod:`.erase_http`); set before :meth:`start`
        self.erase: EraseHook | None = None
        #: /metrics, /livez, /readyz (:mod:`.ops_http`), when the gateway gives them
        self.ops = ops
        #: messages handed to the broker, by QoS (the ``protocol="http"`` series)
        self.published_by_qos = [0, 0, 0]
        self.access = access
        self.settings = settings
        self.snapshot = snapshot
        self.tokens = (
            TokenDB.load(settings.tokens_file)
            if settings.tokens_file is not None and settings.tokens_file.exists()
            else TokenDB(path=settings.tokens_file)
        )
        self.streams: set[_Stream] = set()
        self.closing = False
        self.runner: web.AppRunner | None = None
        self.stats = {"published": 0, "refused": 0, "streams": 0, "stream_dropped": 0}
        #: refusals repeat (a device retrying): logged once, then once a minute with a count
        self._repeats = RepeatedLog(log)
        self.dashboard: Any = None  # .dashboard.Dashboard, showing the ``dashboard`` snapshot
        if dashboard is not None:
            from .dashboard import Dashboard

            self.dashboard = Dashboard(self.tokens, dashboard)

    # -- lifecycle -----------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application (exposed for tests)."""
        app = web.Application(client_max_size=self.settings.max_body, middlewares=[_json_errors])
        app.router.add_post(f"{API}/publish", self.publish)
        app.router.add_get(f"{API}/subscribe", self.subscribe)
        app.router.add_get(f"{API}/health", self.health)
        if self.verdicts is not None:
            add_incident_routes(app, self.verdicts, self._authenticate, API)
        if self.erase is not None:
            add_erase_routes(app, self.erase, self._authenticate, API)
        if self.ops is not None:
            add_ops_routes(app, self.ops, self._authenticate)
        if self.dashboard is not None:
            self.dashboard.add_routes(app)
        return app

    async def start(self) -> list[str]:
        """Bind every ``listen`` endpoint; return the bound URLs."""
        if self.settings.tokens_file is None:
            log.warning("http: no tokens_file set: only /api/v1/health will answer")
        elif not self.settings.tokens_file.exists():
            log.warning("http: tokens file %s does not exist (yet): no tokens accepted",
                        self.settings.tokens_file)
        self.runner = web.AppRunner(
            self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await self.runner.setup()
        if self.dashboard is not None:
            self.dashboard.start()
        tls = self.settings.tls
        urls = []
        for i, ep in enumerate(self.settings.listen):
            ctx = None
            if ep.scheme == "https" and tls is not None:
                from .mqtt_server import make_ssl_context

                ctx = make_ssl_context(str(tls.cert), str(tls.key),
                                       str(tls.client_ca) if tls.client_ca else None,
                                       tls.require_client_cert)
            site = web.TCPSite(self.runner, ep.host, ep.port, reuse_address=True,
                               ssl_context=ctx)
            before = list(self.runner.addresses)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(f"http.listen[{i}] {ep.url}: {exc.strerror or exc}") from exc
            for addr in self.runner.addresses:  # the new ones: this site's (port 0 resolved)
                if addr in before:
                    continue
                host, port = addr[0], addr[1]
                url = (f"{ep.scheme}://[{host}]:{port}" if ":" in host
                       else f"{ep.scheme}://{host}:{port}")
                urls.append(url)
                log.info("http api listening on %s", url)
        return urls

    async def stop(self) -> None:
        """End every event stream, then close the listeners."""
        self.closing = True
        for s in list(self.streams):
            s.wake.set()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.runner is not None:
            await asyncio.sleep(0)  # let the streams see it
            await self.runner.cleanup()
            self.runner = None

    # -- authentication ------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> Token | web.Response:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="rapidmq-edge"'}
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "missing bearer token", challenge)
        try:
            self.tokens.reload_if_changed()
        except TokensFileError as exc:
            log.error("http: %s (keeping the previous tokens)", exc)
        entry = self.tokens.lookup(token.strip())
        if entry is None:
            return _error(401, "invalid token", {
                "WWW-Authenticate": 'Bearer realm="rapidmq-edge", error="invalid_token"'
            })
        return entry

    # -- handlers ------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /api/v1/publish``."""
        auth = self._authenticate(request)
        if isinstance(auth, web.Response):
            return auth
        if not auth.may_publish:
            return _error(403, f"token {auth.name!r} has the read role: it may not publish")
        length = request.content_length
        if length is not None and length > self.settings.max_body:
            return _error(413, f"body larger than {self.settings.max_body} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body larger than {self.settings.max_body} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"invalid JSON: {exc}")
        except RecursionError:
            return _error(400, "invalid JSON: nested too deeply")
        try:
            topic, payload, qos, retain, props = _publish_fields(data)
        except _BadRequest as exc:
            return _error(400, str(exc))
        limits = self.broker.limits
        if qos > limits.max_qos:
            return _error(400, f"qos: this gateway accepts at most QoS {limits.max_qos}")
        if retain and not limits.retain_available:
            return _error(400, "retain: retained messages are disabled on this gateway")
        client_id = f"http-{auth.name}"
        name = topic  # a tenant token's topics are below its tenant's mountpoint
        prefix = self.access.accept_identity(client_id, auth.user,
                                             certificate_cn(request.transport))
        if prefix is not None and not topic.startswith("$"):
            topic = TenantMount(prefix).inbound(topic)
        if topic.startswith("$SYS") or not self.access.can_publish(auth.user, client_id, topic,
                                                                   qos, retain):
            self._repeats(f"deny-publish:{auth.name}", logging.INFO,
                          "http token %s (user %s) not authorised to publish to %s",
                          auth.name, auth.user, topic)
            return _error(403, f"not authorised to publish to {name!r}")
        msg = Message(topic, payload, qos, retain, props, None, client_id)
        broker = self.broker
        self.published_by_qos[qos] += 1
        try:
            receivers = broker.publish(msg)  # as broker.local.publish(), keeping the count
        except PublishRefused as exc:
            self.stats["refused"] += 1
            self._repeats("refused", logging.INFO, "http publish to %s refused: %s", topic, exc)
            return _error(503, f"message refused: {exc}", {"Retry-After": str(RETRY_AFTER)})
        fut = broker.commit_future()
        if fut is not None:
            try:
                # shielded: the future is shared; a client hanging up must not cancel it
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats["refused"] += 1
                self._repeats("not-stored", logging.WARNING,
                              "http publish to %s not stored: %s", topic, exc)
                return _error(503, f"message not stored: {exc}",
                              {"Retry-After": str(RETRY_AFTER)})
        if msg.refused is not None:  # refused after its micro-batch was scored
            self.stats["refused"] += 1
            self._repeats("refused", logging.INFO, "http publish to %s refused: %s", topic,
                          msg.refused)
            return _error(503, f"message refused: {msg.refused}",
                          {"Retry-After": str(RETRY_AFTER)})
        self.stats["published"] += 1
        return web.json_response({"ok": True, "receivers": receivers})

    async def health(self, request: web.Request) -> web.Response:
        """``GET /api/v1/health`` (no token needed)."""
        snap = self.snapshot()
        st = self.broker.stats
        fwd = snap.get("forwarding")
        body: dict[str, Any] = {
            "ok": True,
            "status": "ok",
            "gateway": snap.get("gateway"),
            "uptime": int(time.time() - st.started),
            "clients_connected": max(0, st.clients_connected - len(self.streams)),
            "sessions": len(self.broker.sessions),
            "http_streams": len(self.streams),
            "forwarding": _forwarding_summary(fwd) if fwd else None,
        }
        if body["forwarding"] is not None and not all(
            u["connected"] for u in body["forwarding"]["upstreams"].values()
        ):
            body["status"] = "degraded"
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/subscribe?filter=...``: a Server-Sent Events stream."""
        auth = self._authenticate(request)
        if isinstance(auth, web.Response):
            return auth
        if self.closing:
            return _error(503, "shutting down", {"Retry-After": str(RETRY_AFTER)})
        filters = request.query.getall("filter", [])
        if len(filters) != 1:
            return _error(400, "filter: exactly one filter query parameter is required")
        filt = filters[0]
        if not valid_subscription_filter(filt):
            return _error(400, f"filter: not a valid MQTT topic filter: {filt!r}")
        client_id = f"http-{auth.name}-{uuid.uuid4().hex[:12]}"
        cert_cn = certificate_cn(request.transport)
        prefix = self.access.accept_identity(client_id, auth.user, cert_cn)
        mount = None if prefix is None else TenantMount(prefix)
        wanted = filt if mount is None else mount.filter(filt)
        if not self.access.can_subscribe(auth.user, client_id, wanted):
            self._repeats(f"deny-subscribe:{auth.name}", logging.INFO,
                          "http token %s (user %s) not authorised to subscribe to %s",
                          auth.name, auth.user, wanted)
            if cert_cn is not None:
                self.access.accept_identity(client_id, auth.user, None)  # forget the CN
            return _error(403, f"not authorised to subscribe to {filt!r}")
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        })
        await resp.prepare(request)
        stream = _Stream(mount, wanted)
        self.streams.add(stream)
        self.stats["streams"] += 1
        client: LocalClient | None = None
        try:
            await resp.write(f": subscribed to {json.dumps(filt)}\n\n".encode())
            client = LocalClient(self.broker, client_id, stream.push, auth.user)
            code = client.subscribe(wanted)  # retained messages are pushed right here
            if code >= 0x80:
                await resp.write(b'event: error\ndata: {"error": "subscription refused"}\n\n')
                return resp
            await self._pump(request, resp, stream)
        except ConnectionResetError:
            pass  # the client went away (a cancellation, on hang-up, propagates)
        finally:
            if client is not None:
                client.close()
            if cert_cn is not None:  # the stream's client id ends with it
                self.access.accept_identity(client_id, auth.user, None)
            self.streams.discard(stream)
            self.stats["stream_dropped"] += stream.dropped
        return resp

    async def _pump(self, request: web.Request, resp: web.StreamResponse, s: _Stream) -> None:
        last_write = time.monotonic()
        while not self.closing:
            if s.buffer:
                chunk = b"".join(s.take())
                if s.dropped != s.reported:
                    s.reported = s.dropped
                    chunk = f'event: dropped\ndata: {{"dropped": {s.dropped}}}\n\n'.encode() + chunk
                await resp.write(chunk)
                last_write = time.monotonic()
                continue
            s.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(s.wake.wait(), _POLL)
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            if not s.buffer and time.monotonic() - last_write >= HEARTBEAT:
                await resp.write(b": heartbeat\n\n")
                last_write = time.monotonic()


def _forwarding_summary(fwd: dict[str, Any]) -> dict[str, Any]:
    ups = {
        name: {
            "connected": bool(u.get("connected")),
            "queued": u.get("queued", 0),
            "oldest_age": u.get("oldest_age", 0.0),
            "drain_eta_s": u.get("drain_eta_s"),
        }
        for name, u in (fwd.get("upstreams") or {}).items()
    }
    return {
        "upstreams": ups,
        "queued": fwd.get("queued", 0),
        "queued_bytes": fwd.get("queued_bytes", 0),
        "drops": fwd.get("drops", 0),
        "refused": fwd.get("refused", 0),
        "forwarded": fwd.get("forwarded", 0),
    }


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413...) as JSON like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _error(exc.status, exc.reason, headers)
