"""``/dashboard`` on the HTTP listener.

* ``GET  /dashboard``            the page (a login form first, without a session)
* ``POST /dashboard/login``      ``token=...`` (a form) -> the session cookie, or 401
* ``POST /dashboard/logout``     ends the session
* ``GET  /dashboard/events``     Server-Sent Events: one ``snapshot`` event a second
* ``GET  /dashboard/snapshot``   the latest snapshot as JSON
* ``GET  /dashboard/static/...`` HTML, JS, CSS and the vendored uPlot (no session needed)

Any token may log in (a ``read`` token is enough). ``events`` and ``snapshot`` also take
``Authorization: Bearer`` (for scripts). The token never appears in a URL or a log line.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ...security.tokens import Token, TokenDB, TokensFileError
from ...telemetry import RepeatedLog
from .feed import SnapshotFeed, Viewer
from .sessions import COOKIE, Sessions

__all__ = ["BASE", "STATIC", "Dashboard", "static_files"]

log = logging.getLogger(__name__)

BASE = "/dashboard"
STATIC = Path(__file__).parent / "static"
#: seconds between SSE comments when no frame is due (keeps proxies from timing out)
HEARTBEAT = 15.0
_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; "
                                "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def static_files(root: Path = STATIC) -> dict[str, tuple[bytes, bytes, str]]:
    """Every file below ``root``: relative path -> (bytes, gzipped bytes, content type)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            raw = path.read_bytes()
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype.endswith("javascript"):
                ctype += "; charset=utf-8"
            out[path.relative_to(root).as_posix()] = (raw, gzip.compress(raw, 9, mtime=0),
                                                      ctype)
    return out


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


class Dashboard:
    """The dashboard's routes, its logins and its feed."""

    def __init__(self, tokens: TokenDB, build: Callable[[], dict[str, Any]],
                 secure_cookie: bool = False, interval: float = 1.0) -> None:
        self.tokens = tokens
        self.feed = SnapshotFeed(build, interval)
        self.sessions = Sessions()
        self.secure_cookie = secure_cookie
        self.files = static_files()
        self.closing = False
        self._repeats = RepeatedLog(log)

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.root)  # a browser pointed at the listener finds the dashboard
        r.add_get(BASE, self.page)
        r.add_get(BASE + "/", self.page)
        r.add_get(BASE + "/login", self.login_page)
        r.add_post(BASE + "/login", self.login)
        r.add_post(BASE + "/logout", self.logout)
        r.add_get(BASE + "/events", self.events)
        r.add_get(BASE + "/snapshot", self.snapshot)
        r.add_get(BASE + "/static/{name:.+}", self.static)

    async def root(self, request: web.Request) -> web.Response:
        """``/``: to the dashboard."""
        return _see_other(BASE)

    def start(self) -> None:
        self.feed.start()

    async def stop(self) -> None:
        self.closing = True
        await self.feed.stop()

    # -- who is asking ---------------------------------------------------------------

    def _reload(self) -> None:
        try:
            self.tokens.reload_if_changed()
        except TokensFileError as exc:
            log.error("dashboard: %s (keeping the previous tokens)", exc)

    def _viewer(self, request: web.Request) -> Token | None:
        """The token behind the request's session cookie or bearer header (None: nobody)."""
        self._reload()
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return self.tokens.lookup(value.strip())
        s = self.sessions.get(request.cookies.get(COOKIE))
        if s is None:
            return None
        for t in self.tokens.tokens():  # still there? (removing a token ends its sessions)
            if t.name == s.token_name and t.hash == s.token_hash:
                return t
        return None

    # -- pages -----------------------------------------------------------------------

    def _file(self, request: web.Request, name: str, status: int = 200,
              cache: str = "no-store") -> web.Response:
        raw, packed, ctype = self.files[name]
        headers = {**_SECURITY_HEADERS, "Cache-Control": cache, "Vary": "Accept-Encoding",
                   "Content-Type": ctype}
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=packed, status=status, headers=headers)
        return web.Response(body=raw, status=status, headers=headers)

    async def page(self, request: web.Request) -> web.Response:
        if self._viewer(request) is None:
            return _see_other(BASE + "/login")
        return self._file(request, "index.html")

    async def login_page(self, request: web.Request) -> web.Response:
        return self._file(request, "login.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files or name.endswith(".html"):
            return web.json_response({"ok": False, "error": "not found"}, status=404)
        return self._file(request, name, cache="public, max-age=3600")

    async def login(self, request: web.Request) -> web.Response:
        """The form's token for a session cookie; a wrong token gets the form again (401)."""
        form = await request.post()
        token = form.get("token")
        self._reload()
        entry = self.tokens.lookup(token.strip()) if isinstance(token, str) else None
        if entry is None:
            self._repeats("login-refused", logging.INFO,
                          "dashboard: login refused from %s (unknown token)", request.remote)
            return self._file(request, "login.html", status=401)
        sid = self.sessions.create(entry.name, entry.hash)
        log.info("dashboard: token %s (user %s, role %s) logged in from %s", entry.name,
                 entry.user, entry.role, request.remote)
        resp = _see_other(BASE)
        resp.set_cookie(COOKIE, sid, path=BASE, httponly=True, samesite="Strict",
                        secure=self.secure_cookie or request.secure,
                        max_age=int(self.sessions.ttl))
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        self.sessions.end(request.cookies.get(COOKIE))
        resp = _see_other(BASE + "/login")
        resp.del_cookie(COOKIE, path=BASE)
        return resp

    # -- data ------------------------------------------------------------------------

    def _refuse(self) -> web.Response:
        return web.json_response({"ok": False, "error": "log in first (or a bearer token)"},
                                 status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="rapidmq-edge"'})

    async def snapshot(self, request: web.Request) -> web.Response:
        if self._viewer(request) is None:
            return self._refuse()
        frame = self.feed.latest or self.feed.frame()
        body = frame.split(b"data: ", 1)[1].rstrip(b"\n")
        return web.Response(body=body, content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        if self._viewer(request) is None:
            return self._refuse()
        if self.closing:
            return web.json_response({"ok": False, "error": "shutting down"}, status=503)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        })
        await resp.prepare(request)
        viewer = self.feed.join()
        try:
            await resp.write(b"retry: 2000\n\n")
            await self._pump(request, resp, viewer)
        except ConnectionResetError:
            pass
        finally:
            self.feed.leave(viewer)
        return resp

    async def _pump(self, request: web.Request, resp: web.StreamResponse, v: Viewer) -> None:
        idle = 0.0
        while not self.closing:
            try:
                await asyncio.wait_for(v.wake.wait(), 1.0)
            except TimeoutError:
                idle += 1.0
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            frame = v.take()
            if frame is not None:
                await resp.write(frame)
                idle = 0.0
            elif idle >= HEARTBEAT:
                await resp.write(b": heartbeat\n\n")
                idle = 0.0
