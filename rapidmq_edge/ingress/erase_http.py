"""``POST /api/v1/erase``: erase everything held about a device on the running gateway
(admin tokens; ``gateway.erasure_live.LiveErasure.http`` does the erasure).

Body ``{"device": "<client id>", "oscore": false, "token": "<name>", "queue": "erase"}``
(only ``device`` required). 200 with the report (rows erased per store, the receipt, the
writer pauses), 400 bad body, 403 not an admin token, 404 unknown device (nothing erased,
no receipt).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..security.tokens import Token

__all__ = ["MAX_BODY", "EraseHook", "add_erase_routes"]

#: bytes of an erasure request's body
MAX_BODY = 4 * 1024

#: (parsed JSON body, the token's name) -> (HTTP status, JSON answer)
EraseHook = Callable[[Any, str], Awaitable[tuple[int, dict[str, Any]]]]
Authenticate = Callable[[web.Request], "Token | web.Response"]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


def add_erase_routes(app: web.Application, hook: EraseHook, authenticate: Authenticate,
                     api: str = "/api/v1") -> None:
    """Add ``POST {api}/erase`` to ``app``."""

    async def erase(request: web.Request) -> web.Response:
        auth = authenticate(request)
        if isinstance(auth, web.Response):
            return auth
        if auth.role != "admin":
            return _error(403, f"token {auth.name!r} has the {auth.role} role: erasure "
                               "needs an admin token")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return _error(400, f"body is not JSON: {exc}")
        status, doc = await hook(body, auth.name)
        if status >= 400:
            return _error(status, str(doc.get("error", "refused")))
        return web.json_response({"ok": True, **doc}, status=status)

    app.router.add_post(f"{api}/erase", erase)
