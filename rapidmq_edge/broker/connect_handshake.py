"""CONNECT handling of a broker connection: refusal, authentication, session negotiation.

:class:`ConnectHandshake` is mixed into :class:`~.connection.ClientConnection`: it answers
the first packet (CONNECT) with a CONNACK, authenticating off the event loop when a password
hash must be checked (packets read meanwhile are held), negotiating the session terms
(:func:`~.negotiation.negotiate`) and holding the CONNACK back until a persistent session is
committed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from ..mqtt import reasons as rc
from ..mqtt.codec import encode
from ..mqtt.errors import MqttError
from ..mqtt.mountpoint import TenantMount
from ..mqtt.packets import MQTT_5, Connack, Connect, Packet
from .broker import Broker
from .client_certificate import certificate_cn
from .negotiation import ConnectionSettings, negotiate
from .policy import AccessPolicy, BehaviourObserver
from .session import Session

if TYPE_CHECKING:
    from .connection import Transport

__all__ = ["ConnectHandshake", "REFUSED_CONNECT_WAIT"]

log = logging.getLogger(__name__)

REFUSED_CONNECT_WAIT = 2.0  # longest wait for the CONNECT of a connection to be refused
#: an accepted 3.1.1 CONNACK by Session Present (no properties: the same bytes as encode())
CONNACK_311 = {False: bytes((0x20, 0x02, 0x00, 0x00)), True: bytes((0x20, 0x02, 0x01, 0x00))}


class ConnectHandshake:
    """CONNECT to CONNACK (mixed into ``ClientConnection``, whose ``__init__`` sets the
    attributes declared here)."""

    if not TYPE_CHECKING:  # no instance dict: ClientConnection declares the slots
        __slots__ = ()

    broker: Broker
    access: AccessPolicy
    settings: ConnectionSettings
    transport: Transport
    peer: str
    watch: BehaviourObserver | None
    loop: asyncio.AbstractEventLoop
    version: int
    v5: bool
    session: Session | None
    client_id: str
    username: str | None
    mount: TenantMount | None
    closed: bool
    send_quota: int
    max_out_size: int
    alias_max_out: int
    keep_alive: int
    _ka_slot: int
    _out: list[bytes]
    _flush_scheduled: bool
    _out_size: int
    _connack: bytes | None
    _connect_refusal: int
    _held: list[Packet] | None

    if TYPE_CHECKING:  # provided by ClientConnection
        def _dispatch(self, p: Packet) -> None: ...
        def _protocol_failure(self, exc: MqttError) -> None: ...
        def _arm_keep_alive(self, delay: float) -> None: ...
        def _cancel_keep_alive(self) -> None: ...
        def _write(self, data: bytes) -> None: ...
        def _flush(self) -> None: ...
        def close(self, send_will: bool = True) -> None: ...

    def refuse_connect(self, reason: int) -> None:
        """Answer the CONNECT with a CONNACK carrying ``reason`` (e.g. connection rate
        exceeded), then close; without a CONNECT soon, close without one."""
        self._connect_refusal = reason
        if self._ka_slot:
            self._arm_keep_alive(min(REFUSED_CONNECT_WAIT, self.settings.connect_timeout))

    def _refuse(self, reason: int) -> None:
        if self.v5:
            self._write(encode(Connack(False, reason), MQTT_5))
        else:
            self._write(bytes((0x20, 0x02, 0x00, rc.v311_connack_code(reason))))
        self.close(send_will=False)

    def _on_connect(self, p: Connect) -> None:
        s = self.settings
        broker = self.broker
        self.version = p.protocol_level
        self.v5 = v5 = p.protocol_level == MQTT_5
        props = p.properties
        if self._connect_refusal:
            return self._refuse(self._connect_refusal)
        if self.watch is not None and (banned := self.watch.admit(p.client_id)):
            return self._refuse(banned)
        if "authentication_method" in props:
            return self._refuse(rc.BAD_AUTHENTICATION_METHOD)
        if broker.stats.clients_connected >= s.max_connections:
            return self._refuse(rc.QUOTA_EXCEEDED if v5 else rc.SERVER_UNAVAILABLE)
        client_id = p.client_id
        assigned = False
        if not client_id:
            if not v5 and not p.clean_start:
                return self._refuse(rc.CLIENT_IDENTIFIER_NOT_VALID)
            client_id = broker.assign_client_id()
            assigned = True
        # a verified client certificate may name the user (use_cn_as_username) and log it in
        cn = certificate_cn(self.transport)
        username, reason = self.access.certificate_login(p.username, cn)
        if username != p.username:
            p = replace(p, username=username, password=None)
        if reason is None:
            reason = self.access.quick_authenticate(p.username, p.password)
        if reason is None:  # a password hash to check: off the event loop
            self._held = []
            self.transport.pause_reading()
            task = self.loop.create_task(self.access.authenticate(p.username, p.password))
            task.add_done_callback(lambda t: self._authenticated(t, p, client_id, assigned, cn))
            return
        self._accept(p, client_id, assigned, reason, cn)

    def _authenticated(
        self, task: asyncio.Task[int], p: Connect, client_id: str, assigned: bool,
        cn: str | None,
    ) -> None:
        held, self._held = self._held or [], None
        if self.closed:
            return
        try:
            reason = task.result()
        except Exception:  # pragma: no cover - a broken users file must not kill the loop
            log.exception("authentication failed")
            reason = rc.SERVER_UNAVAILABLE
        self._accept(p, client_id, assigned, reason, cn)
        for packet in held:
            if self.closed:
                return
            try:
                self._dispatch(packet)
            except MqttError as exc:
                self._protocol_failure(exc)
                return
        if not self.closed:
            self.transport.resume_reading()

    def _accept(self, p: Connect, client_id: str, assigned: bool, reason: int,
                cn: str | None) -> None:
        s = self.settings
        broker = self.broker
        if self.watch is not None:
            self.watch.connected(self, client_id, p.username, reason)
        if reason:
            log.info("client %s (%s) refused: %s", client_id, self.peer, rc.describe(reason))
            return self._refuse(reason)
        # the client's identity for role rules; its tenant's mountpoint when invisible
        prefix = self.access.accept_identity(client_id, p.username, cn)
        mount = None if prefix is None else TenantMount(prefix)
        will = p.will if p.will is None or mount is None else mount.will(p.will)
        if will is not None and (will.topic.startswith("$SYS") or not self.access.can_publish(
                p.username, client_id, will.topic, will.qos, will.retain)):
            log.info("client %s (%s) refused: not authorised to publish its will to %s",
                     client_id, self.peer, will.topic)
            return self._refuse(rc.NOT_AUTHORIZED)
        terms = negotiate(p, s, client_id if assigned else None)
        if isinstance(terms, int):
            return self._refuse(terms)
        self.send_quota = terms.send_quota
        self.max_out_size = terms.max_out_size
        self.alias_max_out = terms.alias_max_out
        self.client_id = client_id
        self.username = p.username
        self.keep_alive = ka = terms.keep_alive
        session, present = broker.open_session(
            self,  # type: ignore[arg-type]  # the ClientConnection this is mixed into (a Link)
            client_id, p.clean_start, terms.session_expiry, p.protocol_level, p.username,
        )
        self.session = session
        ack_props = terms.connack_properties
        connack = (encode(Connack(present, 0, ack_props), self.version) if self.v5
                   else CONNACK_311[present])
        fut = None
        if session.persistent and session.store is not None:
            fut = session.store.commit_future()  # the session row (Session Present holds)
        if fut is None:
            self._write(connack)
        else:  # everything written until then (resends, acks, ...) waits behind it
            self._connack = connack
            fut.add_done_callback(self._connack_committed)
        session.will = will
        if mount is not None:  # topics rewritten at the edges from now on
            from .mounted_connection import MountedConnection

            self.mount = mount
            self.__class__ = MountedConnection  # type: ignore[assignment]
        if ka:
            self._arm_keep_alive(ka * 1.5)  # (replaces the CONNECT deadline)
        else:
            self._cancel_keep_alive()
        if present:  # (a new session has nothing queued)
            session.resend_inflight()
            session.pump()
        log.debug("client %s connected from %s (v%d)", client_id, self.peer, self.version)

    def _connack_committed(self, fut: asyncio.Future[None]) -> None:
        connack, self._connack = self._connack, None
        if connack is None or self.closed:
            return
        if fut.cancelled() or fut.exception() is not None:
            # the session is not stored: refuse rather than promise it (the store retries)
            self._out.clear()
            self._out_size = 0
            self._flush_scheduled = False
            log.warning("client %s refused: its session could not be stored", self.client_id)
            self._refuse(rc.SERVER_UNAVAILABLE)
            return
        self._out.insert(0, connack)
        self._flush()
