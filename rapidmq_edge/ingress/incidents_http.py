"""``POST /api/v1/incidents/{id}``: an operator's verdict on an incident (admin tokens).

Body ``{"verdict": "confirmed" | "dismissed", "note": "..."}`` (note optional). The
gateway's hook (``ota.feedback_upload.FeedbackService.http_verdict``) checks that the
incident was announced here, stores the verdict durably and uploads it on the feedback
channel; this module does the HTTP part: the token (``admin`` role), the body size and JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..security.tokens import Token

__all__ = ["MAX_BODY", "VerdictHook", "add_incident_routes"]

#: bytes of a verdict request's body
MAX_BODY = 16 * 1024

#: (incident id, parsed JSON body, the token's name) -> (HTTP status, JSON answer)
VerdictHook = Callable[[str, Any, str], Awaitable[tuple[int, dict[str, Any]]]]
Authenticate = Callable[[web.Request], "Token | web.Response"]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)


def add_incident_routes(app: web.Application, hook: VerdictHook, authenticate: Authenticate,
                        api: str = "/api/v1") -> None:
    """Add ``POST {api}/incidents/{id}`` to ``app``."""

    async def verdict(request: web.Request) -> web.Response:
        auth = authenticate(request)
        if isinstance(auth, web.Response):
            return auth
        if auth.role != "admin":
            return _error(403, f"token {auth.name!r} has the {auth.role} role: verdicts "
                               "need an admin token")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        raw = await request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return _error(400, f"body is not JSON: {exc}")
        status, doc = await hook(request.match_info["incident"], body, auth.name)
        if status >= 400:
            return _error(status, str(doc.get("error", "refused")))
        return web.json_response({"ok": True, **doc}, status=status)

    app.router.add_post(f"{api}/incidents/{{incident}}", verdict)
