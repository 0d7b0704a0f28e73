"""``POST /api/v1/erase``: erase everything held about a device on the running gateway
(admin tokens; ``gateway.erasure_live.LiveErasure.http`` does the erasure).

Body ``{"device": "<client id>", "oscore": false, "token": "<name>", "queue": "erase"}``
(only ``device`` required). 200 with the report (rows erased per store, the receipt, the
writer pauses), 400 bad body, 403 not an admin token, 404 unknown device (nothing erased,
no receipt).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .admin_http import Authenticate, admin_json, answer

__all__ = ["MAX_BODY", "EraseHook", "add_erase_routes"]

#: bytes of an erasure request's body
MAX_BODY = 4 * 1024

#: (parsed JSON body, the token's name) -> (HTTP status, JSON answer)
EraseHook = Callable[[Any, str], Awaitable[tuple[int, dict[str, Any]]]]


def add_erase_routes(app: web.Application, hook: EraseHook, authenticate: Authenticate,
                     api: str = "/api/v1") -> None:
    """Add ``POST {api}/erase`` to ``app``."""

    async def erase(request: web.Request) -> web.Response:
        got = await admin_json(request, authenticate, MAX_BODY, "erasures")
        if isinstance(got, web.Response):
            return got
        token, body = got
        return answer(*await hook(body, token.name))

    app.router.add_post(f"{api}/erase", erase)
