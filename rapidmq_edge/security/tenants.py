"""Tenants: which customer a client belongs to, and the part of the topic tree it may use.

A tenant is derived from the credentials (``[auth] tenant_source``):

* ``username_prefix``: the user name up to ``tenant_separator`` (``acme:alice`` -> ``acme``);
* ``user_attribute``: the ``tenant`` key of the user's entry in the users file;
* ``certificate``: the TLS client certificate's subject CN up to ``tenant_separator``
  (``acme:dev-1`` -> ``acme``); with ``use_cn_as_username`` the CN is the user name, so
  this is the user-name rule applied to a name only a certificate can give.

A client with a tenant only reaches topics under its mountpoint (``tenant_mountpoint``,
default ``tenants/${tenant}/``). By default the mountpoint is invisible: the client names
``sensors/t`` and the broker holds ``tenants/acme/sensors/t`` (the rewrite is
:class:`~rapidmq_edge.mqtt.mountpoint.TenantMount`, applied by the connection). Either way
the guard below checks the broker's topics: it publishes, subscribes (``$share/g/``
stripped) and receives under the mountpoint and nowhere else, never publishes to its
``$`` topics (its ``$SYS`` view is the gateway's), and its wills and retained messages stay
in its tenant. The guard runs before any role or ``[[acl]]`` rule; clients without a tenant
(operators, anonymous ones) are left to the rules. Pure functions;
:class:`~.gatekeeper.Gatekeeper` applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..config.access import TENANT_SOURCES
from ..mqtt.topics import parse_shared

__all__ = ["TENANT_SOURCES", "TenantScope", "valid_tenant"]


def valid_tenant(name: str) -> bool:
    """A tenant is one ordinary topic level: 1-64 printable characters without / + # $."""
    return (0 < len(name) <= 64 and name.isprintable()
            and not any(c in name for c in "/+#$"))


class TenantScope:
    """Tenant of a user name and the mountpoint its topics must stay under."""

    def __init__(self, source: str, separator: str = ":",
                 mountpoint: str = "tenants/${tenant}/",
                 attributes: Callable[[], Mapping[str, str]] | None = None) -> None:
        if source not in TENANT_SOURCES:
            raise ValueError(f"tenant source must be one of {', '.join(TENANT_SOURCES)}")
        if "${tenant}" not in mountpoint or not mountpoint.endswith("/"):
            raise ValueError("tenant mountpoint must hold ${tenant} and end with /")
        self.source = source
        self.separator = separator
        self.mountpoint = mountpoint
        self._attributes = attributes

    @property
    def enabled(self) -> bool:
        """False for ``none``: nobody has a tenant."""
        return self.source != "none"

    def tenant_of(self, username: str | None) -> str | None:
        """The tenant of a user name; None when it has none (or an unusable one)."""
        if username is None or self.source == "none":
            return None
        if self.source in ("username_prefix", "certificate"):
            head, sep, _rest = username.partition(self.separator)
            tenant = head if sep else None
        else:
            tenant = self._attributes().get(username) if self._attributes is not None else None
        return tenant if tenant is not None and valid_tenant(tenant) else None

    def mount(self, username: str | None) -> str | None:
        """The topic prefix a user's client is confined to; None when unconfined."""
        tenant = self.tenant_of(username)
        return None if tenant is None else self.mountpoint.replace("${tenant}", tenant)

    def allows_topic(self, username: str | None, topic: str) -> bool:
        """May this user name a topic (publish, receive)?"""
        mount = self.mount(username)
        return mount is None or topic.startswith(mount)

    def allows_publish(self, username: str | None, topic: str) -> bool:
        """May this user publish to ``topic``? Under its mountpoint, not a ``$`` topic."""
        mount = self.mount(username)
        return mount is None or (topic.startswith(mount) and topic[len(mount):len(mount) + 1]
                                 not in ("$", ""))

    def allows_filter(self, username: str | None, filt: str) -> bool:
        """May this user subscribe to ``filt``? Its literal levels must spell the mountpoint."""
        mount = self.mount(username)
        if mount is None:
            return True
        try:
            _group, inner = parse_shared(filt)
        except ValueError:
            return False
        return inner.startswith(mount)
