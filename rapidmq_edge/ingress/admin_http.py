"""The HTTP part every admin ``POST`` shares: the token (``admin`` role), the body's size
and JSON, and the ``{"ok": ...}`` answer (``incidents_http``, ``erase_http``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..security.tokens import Token

__all__ = ["Authenticate", "admin_json", "answer", "error"]

Authenticate = Callable[[web.Request], "Token | web.Response"]


def error(status: int, message: str) -> web.Response:
    """``{"ok": false, "error": message}`` with ``status``."""
    return web.json_response({"ok": False, "error": message}, status=status)


def answer(status: int, doc: dict[str, Any]) -> web.Response:
    """A hook's (status, document) as the response: ``ok`` with the document, or an error."""
    if status >= 400:
        return error(status, str(doc.get("error", "refused")))
    return web.json_response({"ok": True, **doc}, status=status)


async def admin_json(request: web.Request, authenticate: Authenticate, max_body: int,
                     what: str) -> tuple[Token, Any] | web.Response:
    """The admin token and the parsed JSON body of ``request``, or the refusal: 401 (from
    ``authenticate``), 403 not an admin token (``what`` needs one), 413 body larger than
    ``max_body`` bytes, 400 not JSON."""
    auth = authenticate(request)
    if isinstance(auth, web.Response):
        return auth
    if auth.role != "admin":
        return error(403, f"token {auth.name!r} has the {auth.role} role: {what} "
                          "need an admin token")
    if request.content_length is not None and request.content_length > max_body:
        return error(413, f"body larger than {max_body} bytes")
    raw = await request.content.read(max_body + 1)
    if len(raw) > max_body:
        return error(413, f"body larger than {max_body} bytes")
    try:
        return auth, json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        return error(400, f"body is not JSON: {exc}")
