"""Who may connect, publish and subscribe: the users file and the ACL, as configured."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..mqtt import reasons as rc
from .acl import Acl
from .users import UserDB


class Gatekeeper:
    """Answers the broker's authentication and authorisation questions."""

    def __init__(self, allow_anonymous: bool, users: UserDB | None, acl: Acl) -> None:
        self.allow_anonymous = allow_anonymous
        self.users = users
        self.acl = acl
        #: intelligence.threat.ClientWatch: client-behaviour hooks of the connections
        self.watch: Any = None

    @classmethod
    def from_config(cls, config: Config) -> Gatekeeper:
        """Load the users file (if any) and compile the ACL."""
        users_file = config.auth.users_file
        users = UserDB.load(users_file) if users_file is not None else None
        return cls(config.auth.allow_anonymous, users, Acl.from_config(config))

    def quick_authenticate(self, username: str | None, password: bytes | None) -> int | None:
        """0 or a CONNACK reason code when known without hashing; None otherwise."""
        if username is None:
            return 0 if self.allow_anonymous else rc.NOT_AUTHORIZED
        if self.users is None:
            # No users file: a user name is only a label, as for anonymous clients.
            return 0 if self.allow_anonymous else rc.BAD_USER_NAME_OR_PASSWORD
        if self.users.cached(username, password):
            return 0
        return None

    async def authenticate(self, username: str | None, password: bytes | None) -> int:
        """0 or a CONNACK reason code; password hashes are checked in a worker thread."""
        quick = self.quick_authenticate(username, password)
        if quick is not None:
            return quick
        assert self.users is not None and username is not None
        if await self.users.authenticate_async(username, password):
            return 0
        return rc.BAD_USER_NAME_OR_PASSWORD

    def can_publish(self, username: str | None, client_id: str, topic: str) -> bool:
        """ACL decision for PUBLISH."""
        return self.acl.can_publish(username, client_id, topic)

    def can_subscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """ACL decision for SUBSCRIBE."""
        return self.acl.can_subscribe(username, client_id, filt)
