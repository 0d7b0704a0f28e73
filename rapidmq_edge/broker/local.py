"""In-process subscribers: CoAP observers, HTTP event streams, internal consumers.

A :class:`LocalClient` is a broker session like any MQTT client's (same routing, ACL read
check, retained messages), whose deliveries are handed to a Python callback instead of a
socket. Deliveries are QoS 0 in-process: the callback owns what happens next.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ..mqtt.packets import MQTT_5, SubOptions
from .broker import Broker
from .message import Delivery, Message

Callback = Callable[[Message, bool], None]  # (message, retained-on-subscribe)


class LocalClient:
    """A session of ``client_id`` whose messages go to ``callback``."""

    send_quota = 65535

    def __init__(
        self, broker: Broker, client_id: str, callback: Callback, username: str | None = None
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.callback = callback
        self.session, _ = broker.open_session(self, client_id, True, 0, MQTT_5, username)
        self.closed = False

    # -- the Link protocol ---------------------------------------------------------

    def send_delivery(self, d: Delivery) -> bool:
        """Hand the message to the callback (never blocks the broker)."""
        if d.message.expired(time.time()):
            return False
        self.callback(d.message, d.retain)
        return True

    def send_plain(self, m: Message) -> bool:
        """A QoS 0 delivery without retain flag or subscription identifier."""
        return self.send_delivery(Delivery(m, 0))

    def send_pubrel(self, packet_id: int) -> None:  # pragma: no cover - QoS 0 only
        """Not used: local deliveries are QoS 0."""

    def congested(self) -> bool:
        """Local callbacks never apply backpressure."""
        return False

    # -- subscriptions -------------------------------------------------------------

    def subscribe(self, filt: str, retain_handling: int = 0) -> int:
        """Subscribe at QoS 0; returns 0 or an MQTT reason code (>= 0x80)."""
        opts = SubOptions(0, False, False, retain_handling)
        code, existed = self.broker.subscribe(self.session, filt, opts, None)
        if code < 0x80:
            self.broker.send_retained(self.session, filt, opts, existed)
        return code

    def unsubscribe(self, filt: str) -> bool:
        """Remove a subscription; True when it existed."""
        return self.broker.unsubscribe(self.session, filt)

    def close(self) -> None:
        """End the session (no Will, nothing kept)."""
        if not self.closed:
            self.closed = True
            self.broker.connection_lost(self.session, send_will=False)

    def __repr__(self) -> str:
        return f"LocalClient({self.client_id!r})"


def publish(broker: Broker, msg: Message) -> Any:
    """Publish ``msg`` like a client would; returns what to await until it is stored (or
    None: nothing to wait for).

    Raises :class:`~rapidmq_edge.broker.message.PublishRefused` when a tap refuses it; the
    awaitable raises it when a tap refuses it later (a scored micro-batch), and the store's
    error when the commit fails.
    """
    mark = broker.store_mark()
    broker.publish(msg)
    fut = broker.commit_future(mark)
    return _stored(fut, msg) if fut is not None else None


async def _stored(fut: asyncio.Future[Any], msg: Message) -> None:
    # the commit future is shared with every other publisher of the same group commit:
    # a caller that is cancelled while awaiting must not cancel it for all of them
    await asyncio.shield(fut)
    if msg.refused is not None:  # refused after publish() returned (a scored micro-batch)
        raise msg.refused
