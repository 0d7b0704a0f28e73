"""Dashboard logins: a token exchanged once for an HttpOnly session cookie.

A browser cannot put an ``Authorization`` header on an ``EventSource``, and a token in a
URL ends up in histories and logs. So the login form POSTs the token once; the gateway
answers with a random session id in a cookie (``HttpOnly``: no script reads it;
``SameSite=Strict``: no other site's page sends it; ``Secure`` on HTTPS; ``Path=/dashboard``)
and keeps, in memory only, which token the session stands for. Every request re-checks that
the token still exists: removing a token from the tokens file ends its sessions.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["COOKIE", "Session", "Sessions"]

COOKIE = "rmq_dashboard"
#: a session lasts this long (s) after login
TTL = 12 * 3600.0
#: the most sessions kept (the oldest is forgotten first)
MAX_SESSIONS = 1000


@dataclass(frozen=True, slots=True)
class Session:
    """Who logged in: the token's name and hash (to notice its removal), and until when."""

    token_name: str
    token_hash: str
    expires: float


class Sessions:
    """Session ids -> :class:`Session`, in memory (a restart logs everyone out)."""

    def __init__(self, ttl: float = TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def create(self, token_name: str, token_hash: str) -> str:
        """A new session id for a token just checked."""
        now = self.clock()
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(token_name, token_hash, now + self.ttl)
        return sid

    def get(self, sid: str | None) -> Session | None:
        """The live session of ``sid`` (None: unknown or expired)."""
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires <= self.clock():
            del self._by_id[sid]
            return None
        return s

    def end(self, sid: str | None) -> None:
        """Log out."""
        if sid:
            self._by_id.pop(sid, None)

    def __len__(self) -> int:
        return len(self._by_id)
