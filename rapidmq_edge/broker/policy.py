"""What the broker asks of the outside world, as protocols: who may do what
(:class:`AccessPolicy`, answered by :class:`~rapidmq_edge.security.gatekeeper.Gatekeeper`)
and who watches client behaviour (:class:`BehaviourObserver`, answered by the threat watch
:class:`~rapidmq_edge.intelligence.threat.ClientWatch`). The gateway's assembly passes both
to each connection; the broker imports neither implementation.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["AccessPolicy", "BehaviourObserver"]


class AccessPolicy(Protocol):
    """Authentication and authorisation, as configured. Its decisions may change while the
    gateway runs (RBAC edits); the implementation's ``generation`` changes with them, so a
    cache of its answers must be keyed by (or cleared on) that number."""

    def quick_authenticate(self, username: str | None, password: bytes | None) -> int | None:
        """0 or a CONNACK reason code when known without hashing; None otherwise."""

    async def authenticate(self, username: str | None, password: bytes | None) -> int:
        """0 or a CONNACK reason code (may hash the password in a thread)."""

    def certificate_login(self, username: str | None,
                          cert_cn: str | None) -> tuple[str | None, int | None]:
        """The user name a client is known by and, when its TLS certificate (subject CN
        ``cert_cn``, None without one) decides, 0 or a CONNACK reason code; None: the
        password decides (``authenticate``)."""

    def accept_identity(self, client_id: str, username: str | None,
                        cert_cn: str | None) -> str | None:
        """A CONNECT is accepted with this identity (kept for the role rules). Returns the
        mountpoint its topics are invisibly placed below (a tenant's), or None."""

    def mountpoint_of(self, username: str | None) -> str | None:
        """The invisible mountpoint of this user's tenant (CoAP, HTTP), or None."""

    def can_publish(self, username: str | None, client_id: str, topic: str,
                    qos: int | None = None, retain: bool | None = None) -> bool:
        """May this client publish (``qos`` / ``retain``: for rules qualified by them)?"""

    def can_subscribe(self, username: str | None, client_id: str, filt: str,
                      qos: int | None = None) -> bool:
        """May this client subscribe to ``filt`` (``$share/g/...`` included)?"""

    def can_unsubscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """May this client unsubscribe ``filt`` (refused: UNSUBACK 0x87, it stays)?"""


class BehaviourObserver(Protocol):
    """Hooks a connection calls on what its client does (counting only, on the loop).

    ``link`` is the connection (it has ``disconnect(reason, why)`` and ``limit_rate(rate)``
    for the observer to act on later)."""

    def admit(self, client_id: str) -> int:
        """0, or the CONNACK reason code refusing a banned client."""

    def connected(self, link: Any, client_id: str, username: str | None, reason: int) -> None:
        """A CONNECT was answered with ``reason`` (0: accepted)."""

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None: ...
    def subscribed(self, client_id: str, topic_filter: str, ok: bool) -> None: ...
    def closed(self, link: Any, client_id: str) -> None: ...
