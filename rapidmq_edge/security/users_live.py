"""The users file as a running gateway sees it: re-read when it changes.

``rapidmq-edge user add/remove`` rewrite the file atomically; the gateway notices at the
next login (the file's signature is compared at most once a second, no timer of its own)
or at once on SIGHUP, as Mosquitto reloads its password file. A removed user cannot log in
from then on (the cache of recent logins belongs to the old table); a file that no longer
reads keeps the users loaded before, with one error per change of the file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from ..telemetry import RepeatedLog
from .users import UserDB, UsersFileError

log = logging.getLogger(__name__)

Signature = tuple[int, int, int] | None


def _signature(path: Path) -> Signature:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class LiveUsers:
    """A :class:`UserDB` that follows its file (see the module docstring)."""

    def __init__(self, path: Path, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.every = every
        self._clock = clock
        self._sig = _signature(path)
        self.db = UserDB.load(path)  # at start a bad file is a configuration error
        self._checked = clock()
        self._repeats = RepeatedLog(log)

    def current(self, force: bool = False) -> UserDB:
        """The users in force, re-read first if the file changed (``force``: look now)."""
        now = self._clock()
        if not force and now - self._checked < self.every:
            return self.db
        self._checked = now
        sig = _signature(self.path)
        if sig == self._sig:
            return self.db
        self._sig = sig
        try:
            db = UserDB.load(self.path)
        except UsersFileError as exc:
            self._repeats("read", logging.ERROR, "users file: %s; keeping the %d user(s) "
                          "read before", exc, len(self.db))
            return self.db
        self._repeats.clear("read")
        log.info("users file %s re-read: %d user(s)", self.path, len(db))
        self.db = db
        return db
