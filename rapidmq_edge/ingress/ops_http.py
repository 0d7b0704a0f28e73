"""The operator's HTTP endpoints: ``/metrics``, ``/livez`` and ``/readyz``.

They are added to the HTTP API's application (``[http] listen``) and, when
``[metrics] listen`` is set, served on their own listener as well. ``/livez`` and
``/readyz`` never need a token (probes); ``/metrics`` needs one when ``[metrics] auth`` is
true. What they answer comes from the gateway as callables (:class:`OpsHooks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from ..config.ingress import Endpoint
from ..security.tokens import Token, TokenDB, TokensFileError

__all__ = ["OpsHooks", "OpsServer", "add_ops_routes", "bearer_check"]

log = logging.getLogger(__name__)

Authenticate = Callable[[web.Request], "Token | web.Response"]


@dataclass(frozen=True, slots=True)
class OpsHooks:
    """What the endpoints answer: ``metrics(accept)`` -> (body, content type) or None when
    disabled; ``ready()`` and ``alive()`` -> the reasons it is not (empty: it is)."""

    metrics: Callable[[str | None], tuple[bytes, str]] | None
    metrics_auth: bool
    ready: Callable[[], list[str]]
    alive: Callable[[], list[str]]


def _probe(reasons: list[str]) -> web.Response:
    ok = not reasons
    return web.json_response({"ok": ok, "reasons": reasons}, status=200 if ok else 503,
                             headers={"Cache-Control": "no-store"})


def add_ops_routes(app: web.Application, hooks: OpsHooks, authenticate: Authenticate) -> None:
    """Add ``/livez``, ``/readyz`` and (when enabled) ``/metrics`` to ``app``."""

    async def livez(_request: web.Request) -> web.Response:
        return _probe(hooks.alive())

    async def readyz(_request: web.Request) -> web.Response:
        return _probe(hooks.ready())

    async def metrics(request: web.Request) -> web.Response:
        if hooks.metrics_auth:
            auth = authenticate(request)
            if isinstance(auth, web.Response):
                return auth
        assert hooks.metrics is not None
        body, content_type = hooks.metrics(request.headers.get("Accept"))
        resp = web.Response(body=body, headers={"Cache-Control": "no-store"})
        resp.headers["Content-Type"] = content_type  # with its own version/charset
        return resp

    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    if hooks.metrics is not None:
        app.router.add_get("/metrics", metrics)


def bearer_check(tokens: TokenDB) -> Authenticate:
    """A request's bearer token looked up in ``tokens`` (reloaded when its file changed):
    the Token, or the 401 answer."""

    def check(request: web.Request) -> Token | web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            try:
                tokens.reload_if_changed()
            except TokensFileError as exc:
                log.error("metrics: %s (keeping the previous tokens)", exc)
            entry = tokens.lookup(token.strip())
            if entry is not None:
                return entry
        return web.json_response({"ok": False, "error": "missing or invalid bearer token"},
                                 status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="rapidmq-edge"'})

    return check


class OpsServer:
    """``[metrics] listen``: the three endpoints on their own listener(s)."""

    def __init__(self, hooks: OpsHooks, listen: Sequence[Endpoint], tokens: TokenDB) -> None:
        self.hooks = hooks
        self.listen = listen
        self.tokens = tokens
        self.runner: web.AppRunner | None = None

    async def start(self) -> list[str]:
        """Bind every endpoint; return the bound URLs."""
        app = web.Application()
        add_ops_routes(app, self.hooks, bearer_check(self.tokens))
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        urls = []
        for i, ep in enumerate(self.listen):
            site = web.TCPSite(self.runner, ep.host, ep.port, reuse_address=True)
            before = list(self.runner.addresses)
            try:
                await site.start()
            except OSError as exc:
                raise OSError(f"metrics.listen[{i}] {ep.url}: {exc.strerror or exc}") from exc
            for addr in self.runner.addresses:
                if addr not in before:
                    host, port = addr[0], addr[1]
                    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
                    urls.append(url)
                    log.info("metrics listening on %s", url)
        return urls

    async def stop(self) -> None:
        """Close the listeners."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
