"""Who may connect, publish and subscribe: the users file and the ACL or the RBAC roles.

Every authorisation question of the broker, HTTP and CoAP goes through one
:class:`Gatekeeper`; :attr:`Gatekeeper.generation` changes whenever the rules do (RBAC edits
are picked up live), so a cache of its answers keyed by it never serves a stale decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config
from ..mqtt import reasons as rc
from .acl import Acl
from .rbac import acl_role
from .rbac_live import LiveRbac
from .tenants import TenantScope
from .users import UserDB
from .users_live import LiveUsers

ReadCheck = Callable[[str | None, str, str], bool]


class Gatekeeper:
    """Answers the broker's authentication and authorisation questions."""

    def __init__(self, allow_anonymous: bool, users: UserDB | LiveUsers | None, acl: Acl,
                 rbac: LiveRbac | None = None, tenants: TenantScope | None = None,
                 mountpoint_visible: bool = False, cn_as_username: bool = False) -> None:
        self.allow_anonymous = allow_anonymous
        #: a fixed users table, or the users file followed while running
        self._users = users
        self.acl = acl
        #: with ``[auth] rbac``: the roles (which include the ``[[acl]]`` table)
        self.rbac = rbac
        #: with ``[auth] tenant_source``: each tenant's clients confined to its mountpoint
        self.tenants = tenants if tenants is not None and tenants.enabled else None
        #: True: tenant clients name the full topics (no rewrite, the guard only)
        self.mountpoint_visible = mountpoint_visible
        #: MQTT clients are known by their certificate's CN (``use_cn_as_username``)
        self.cn_as_username = cn_as_username
        #: client id -> subject CN of the TLS client certificate it last connected with
        self.cert_cns: dict[str, str] = {}
        self._identity_epoch = 0  # moves when a client id's certificate CN changes
        #: intelligence.threat.ClientWatch: client-behaviour hooks of the connections
        self.watch: Any = None

    @classmethod
    def from_config(cls, config: Config) -> Gatekeeper:
        """Load the users file (if any; followed while running) and compile the ACL."""
        users_file = config.auth.users_file
        a = config.auth
        live = LiveUsers(users_file) if users_file is not None else None

        def tenant_attributes() -> dict[str, str]:  # of the users table in force
            users = gk.users
            return users.tenants if users is not None else {}

        tenants = TenantScope(a.tenant_source, a.tenant_separator, a.tenant_mountpoint,
                              tenant_attributes if live is not None else None)
        cert_cns: dict[str, str] = {}
        rbac = None
        if a.rbac:
            path = a.rbac_db or config.gateway.data_dir / "rbac.sqlite"
            rbac = LiveRbac(path, acl_role([(r.user, r.topic, r.action, r.access)
                                            for r in config.acl]), tenant_of=tenants.tenant_of,
                            cert_cn_of=cert_cns.get)
        gk = cls(a.allow_anonymous, live, Acl.from_config(config), rbac, tenants,
                 a.tenant_mountpoint_visible, a.use_cn_as_username)
        gk.cert_cns = cert_cns
        return gk

    @property
    def live_users(self) -> LiveUsers | None:
        """The users file followed while running (None: no file, or a fixed table)."""
        return self._users if isinstance(self._users, LiveUsers) else None

    @property
    def users(self) -> UserDB | None:
        """The users in force (a followed file is looked at no more than once a second)."""
        users = self._users
        return users.current() if isinstance(users, LiveUsers) else users

    def reread_users(self) -> None:
        """Re-read the users file now if it changed (SIGHUP)."""
        if isinstance(self._users, LiveUsers):
            self._users.current(force=True)

    @property
    def generation(self) -> int:
        """Identifies the rules in force: changes whenever they do (0: static ``[[acl]]``)."""
        # both only grow, so their sum moves whenever either does
        return (self.rbac.policy().generation + self._identity_epoch
                if self.rbac is not None else 0)

    def certificate_login(self, username: str | None,
                          cert_cn: str | None) -> tuple[str | None, int | None]:
        """With ``use_cn_as_username``: (the CN, 0), or refused without a certificate;
        otherwise the user name stays and the password decides."""
        if not self.cn_as_username:
            return username, None
        if cert_cn is None:
            return username, rc.NOT_AUTHORIZED
        return cert_cn, 0

    def accept_identity(self, client_id: str, username: str | None,
                        cert_cn: str | None) -> str | None:
        """Keep the client's certificate CN (``${cert_cn}`` of role rules); return its
        tenant's mountpoint when the mountpoint is invisible, else None."""
        if self.cert_cns.get(client_id) != cert_cn:
            if cert_cn is None:
                del self.cert_cns[client_id]
            else:
                self.cert_cns[client_id] = cert_cn
            if self.rbac is not None:  # rules bound to the old CN are bound again
                self.rbac.policy().forget(client_id)
                self._identity_epoch += 1
        return self.mountpoint_of(username)

    def mountpoint_of(self, username: str | None) -> str | None:
        """The mountpoint the user's topics are invisibly placed below (its tenant's), or
        None (no tenant, or ``tenant_mountpoint_visible``)."""
        if self.tenants is None or self.mountpoint_visible:
            return None
        return self.tenants.mount(username)

    @property
    def read_check(self) -> ReadCheck | None:
        """The broker's check at delivery; None when every subscriber may read what matches."""
        if self.rbac is not None or self.tenants is not None:
            return self.can_receive
        return self.acl.can_receive if self.acl.restricts_reading else None

    def quick_authenticate(self, username: str | None, password: bytes | None) -> int | None:
        """0 or a CONNACK reason code when known without hashing; None otherwise."""
        if username is None:
            return 0 if self.allow_anonymous else rc.NOT_AUTHORIZED
        users = self.users
        if users is None:
            # No users file: a user name is only a label, as for anonymous clients.
            return 0 if self.allow_anonymous else rc.BAD_USER_NAME_OR_PASSWORD
        if users.cached(username, password):
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

    def can_publish(self, username: str | None, client_id: str, topic: str,
                    qos: int | None = None, retain: bool | None = None) -> bool:
        """Decision for PUBLISH (RBAC qualifiers see ``qos`` / ``retain`` when given)."""
        if self.tenants is not None and not self.tenants.allows_publish(username, topic):
            return False
        if self.rbac is not None:
            return self.rbac.policy().can_publish(username, client_id, topic, qos, retain)
        return self.acl.can_publish(username, client_id, topic)

    def can_subscribe(self, username: str | None, client_id: str, filt: str,
                      qos: int | None = None) -> bool:
        """Decision for SUBSCRIBE."""
        if self.tenants is not None and not self.tenants.allows_filter(username, filt):
            return False
        if self.rbac is not None:
            return self.rbac.policy().can_subscribe(username, client_id, filt, qos)
        return self.acl.can_subscribe(username, client_id, filt)

    def can_unsubscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """Decision for UNSUBSCRIBE: allowed unless an RBAC unsubscribe rule denies it."""
        if self.rbac is not None:
            return self.rbac.policy().can_unsubscribe(username, client_id, filt)
        return True

    def can_receive(self, username: str | None, client_id: str, topic: str) -> bool:
        """Decision at delivery: may a message on ``topic`` go to this client?"""
        if self.tenants is not None and not self.tenants.allows_topic(username, topic):
            return False
        if self.rbac is not None:
            return self.rbac.policy().can_receive(username, client_id, topic)
        return self.acl.can_receive(username, client_id, topic)
