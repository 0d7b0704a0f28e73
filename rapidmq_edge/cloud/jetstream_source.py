"""Consume the cluster's own durable log: a JetStream durable pull consumer on the stream in which
NATS' MQTT listener keeps every QoS 1 PUBLISH (``$MQTT_msgs``, subjects ``$MQTT.msgs.<topic>``).

The same contract as :class:`~rapidmq_edge.cloud.subscriber.Subscriber` (``take`` deliveries,
``acknowledge`` them after the sink commit) on a durable the consumers share: N processes pulling
from ONE durable split its messages (the cluster's ``$share``), and what a dead one fetched and
never acknowledged is redelivered to the others after ``ack_wait``. Explicit acks; at most
``max_ack_pending`` fetched and unacknowledged across the durable. nats-server 2.9 stores an MQTT
PUBLISH as the raw payload with a ``Nmqtt-Pub: <qos>`` header (QoS 0 is not stored, QoS 2 is
refused); the topic is in the subject (:func:`subject_to_topic`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from ..telemetry import RepeatedLog
from .subscriber import Delivery, Inbox

__all__ = ["MQTT_STREAM", "MQTT_SUBJECTS", "JetStreamSource", "filter_to_subject",
           "subject_to_topic"]

log = logging.getLogger(__name__)

MQTT_STREAM = "$MQTT_msgs"
MQTT_SUBJECTS = "$MQTT.msgs."
#: the header nats-server's MQTT layer puts on a stored PUBLISH (its value: the QoS)
PUB_HEADER = "Nmqtt-Pub"


def subject_to_topic(subject: str, prefix: str = MQTT_SUBJECTS) -> str:
    """The MQTT topic of a message NATS' MQTT layer stored under ``subject``.

    nats-server maps ``/`` to ``.`` and an empty level to the token ``/`` (``edge//a/`` ->
    ``edge./.a./``, ``/lead`` -> ``/.lead``: inspected on 2.9.10), and (2.10+) a ``.`` in the
    topic to ``//``; 2.9 refuses ``.`` and spaces in MQTT topics. The topic ``/`` alone stays
    ``/``. Raises ValueError for a subject outside ``prefix``."""
    if not subject.startswith(prefix):
        raise ValueError(f"subject {subject!r} is not under {prefix!r}")
    s = subject[len(prefix):]
    if s == "/":
        return s
    return "/".join("" if tok == "/" else tok.replace("//", ".") for tok in s.split("."))


def filter_to_subject(mqtt_filter: str, prefix: str = MQTT_SUBJECTS) -> str:
    """A JetStream filter subject for an MQTT topic filter of plain levels (``edge/+/#`` ->
    ``$MQTT.msgs.edge.*.>``). Raises ValueError for what 2.9 cannot store (``.``, space,
    empty level)."""
    levels = mqtt_filter.split("/")
    if any(not lv or "." in lv or " " in lv for lv in levels):
        raise ValueError(f"topic filter {mqtt_filter!r}: empty level, '.' or space")
    return prefix + ".".join("*" if lv == "+" else ">" if lv == "#" else lv for lv in levels)


class JetStreamSource:
    """A durable pull consumer ``durable`` on ``stream`` over the NATS ``servers``."""

    def __init__(
        self, servers: Sequence[str], stream: str, durable: str, filter_subject: str,
        *, ack_wait: float = 10.0, max_ack_pending: int = 4096, fetch: int = 256,
        user: str | None = None, password: str | None = None, name: str | None = None,
    ) -> None:
        if not servers or any(not s.startswith(("nats://", "tls://")) for s in servers):
            raise ValueError(f"--servers must be nats://host:port URLs, got {list(servers)!r}")
        if not durable:
            raise ValueError("--durable NAME is required with --source jetstream")
        self.servers = list(servers)
        self.stream, self.durable, self.filter_subject = stream, durable, filter_subject
        self.ack_wait, self.max_ack_pending, self.fetch = ack_wait, max_ack_pending, fetch
        self.user, self.password, self.name = user, password, name
        self.subscribed = asyncio.Event()
        self.received = 0
        self._repeats = RepeatedLog(log)  # an outage: one line, then counts
        self.native = 0  # stored messages without the Nmqtt-Pub header (published over NATS)
        self._stop = asyncio.Event()
        self._inbox = Inbox()
        self._room = asyncio.Event()
        self._room.set()

    async def take(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to ``limit`` fetched deliveries (waits at most ``timeout`` s for the first)."""
        out = await self._inbox.take(limit, timeout)
        if len(self._inbox) < self.fetch:
            self._room.set()
        return out

    async def acknowledge(self, items: Sequence[Delivery]) -> int:
        """Ack ``items`` (committed): the durable forgets them. An ack lost with a node is
        harmless: the message comes again after ``ack_wait`` and is a duplicate by its id."""
        n = 0
        for d in items:
            if d.handle is None:
                continue
            try:
                await d.handle.ack()
                n += 1
            except Exception as exc:  # closed / reconnecting: redelivered after ack_wait
                log.debug("ack: %s", exc)
        return n

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    async def _client_error(self, exc: Exception) -> None:
        """The NATS client's own errors (each failed attempt to reach a node): counted, one
        line a minute, instead of its default traceback per attempt."""
        self._repeats("client", logging.WARNING, "jetstream: nats client: %r", exc)

    async def run(self) -> None:
        """Connect, make sure the durable exists, fetch until :meth:`stop`; reconnects."""
        import nats

        delay = 0.2
        while not self._stop.is_set():
            nc: Any = None
            try:
                # the client retries a first connect for ever: stop() must end that too
                connecting = asyncio.ensure_future(nats.connect(
                    servers=self.servers, user=self.user, password=self.password,
                    name=self.name, connect_timeout=2, reconnect_time_wait=0.5,
                    max_reconnect_attempts=-1, allow_reconnect=True,
                    error_cb=self._client_error))
                stopping = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not connecting.done():
                    connecting.cancel()
                    await asyncio.gather(connecting, return_exceptions=True)
                    break
                nc = connecting.result()
                js = nc.jetstream(timeout=5)
                await self._ensure(js)
                psub = await js.pull_subscribe_bind(self.durable, self.stream)
                self.subscribed.set()
                self._repeats.clear("session", "jetstream %s/%s: bound again", self.stream,
                                    self.durable)
                delay = 0.2
                await self._pull(nc, psub)
            except Exception as exc:  # a node down, no JetStream leader yet, ...
                self._repeats("session", logging.WARNING, "jetstream %s/%s: %s; retrying",
                              self.stream, self.durable, exc)
            finally:
                self.subscribed.clear()
                self._inbox.drop()  # not acknowledged: redelivered after ack_wait
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()
            if self._stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def _ensure(self, js: Any) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
        from nats.js.errors import BadRequestError

        cfg = ConsumerConfig(
            durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL, filter_subject=self.filter_subject,
            ack_wait=self.ack_wait, max_ack_pending=self.max_ack_pending, max_deliver=-1)
        try:
            await js.add_consumer(self.stream, cfg)
        except BadRequestError as exc:  # exists with other settings: use it as it is
            info = await js.consumer_info(self.stream, self.durable)
            log.warning("durable %s exists with other settings (%s); using ack_wait %s, "
                        "max_ack_pending %s, filter %s", self.durable, exc.description,
                        info.config.ack_wait, info.config.max_ack_pending,
                        info.config.filter_subject)

    async def _pull(self, nc: Any, psub: Any) -> None:
        while not self._stop.is_set():
            if not self._room.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.5)
                continue
            if nc.is_closed:
                raise ConnectionError("connection closed")
            try:
                msgs = await psub.fetch(self.fetch, timeout=1.0)
            except TimeoutError:
                continue
            except Exception as exc:  # reconnecting: the client resends the pull after it
                if nc.is_closed:
                    raise
                log.debug("fetch: %s", exc)
                await asyncio.sleep(0.2)
                continue
            self._inbox.put([self._delivery(m) for m in msgs])
            if len(self._inbox) >= self.fetch:
                self._room.clear()

    def _delivery(self, m: Any) -> Delivery:
        self.received += 1
        headers = m.headers or {}
        qos_text = headers.get(PUB_HEADER)
        try:
            topic = subject_to_topic(m.subject)
        except ValueError:
            topic = m.subject
        if qos_text is None:
            self.native += 1
        qos = int(qos_text) if qos_text and qos_text.isdigit() else 1
        return Delivery(topic, bytes(m.data), {}, qos, None, 0, m)
