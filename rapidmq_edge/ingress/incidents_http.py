"""``POST /api/v1/incidents/{id}``: an operator's verdict on an incident (admin tokens).

Body ``{"verdict": "confirmed" | "dismissed", "note": "..."}`` (note optional). The
gateway's hook (``ota.feedback_upload.FeedbackService.http_verdict``) checks that the
incident was announced here, stores the verdict durably and uploads it on the feedback
channel; this module does the HTTP part: the token (``admin`` role), the body size and JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .admin_http import Authenticate, admin_json, answer

__all__ = ["MAX_BODY", "VerdictHook", "add_incident_routes"]

#: bytes of a verdict request's body
MAX_BODY = 16 * 1024

#: (incident id, parsed JSON body, the token's name) -> (HTTP status, JSON answer)
VerdictHook = Callable[[str, Any, str], Awaitable[tuple[int, dict[str, Any]]]]


def add_incident_routes(app: web.Application, hook: VerdictHook, authenticate: Authenticate,
                        api: str = "/api/v1") -> None:
    """Add ``POST {api}/incidents/{id}`` to ``app``."""

    async def verdict(request: web.Request) -> web.Response:
        got = await admin_json(request, authenticate, MAX_BODY, "verdicts")
        if isinstance(got, web.Response):
            return got
        token, body = got
        return answer(*await hook(request.match_info["incident"], body, token.name))

    app.router.add_post(f"{api}/incidents/{{incident}}", verdict)
