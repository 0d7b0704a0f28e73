"""Application messages as the broker routes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mqtt.properties import Properties

#: Properties forwarded unchanged from publisher to subscribers [MQTT-3.3.2-*].
FORWARDED_PROPERTIES = (
    "payload_format_indicator",
    "content_type",
    "response_topic",
    "correlation_data",
    "user_property",
)


@dataclass(slots=True, eq=False)
class Message:
    """One application message. ``expires_at`` is wall-clock seconds or None."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)
    expires_at: float | None = None
    origin: str | None = None
    #: wire-format cache: (is MQTT 5, retain) -> encoded QoS 0 PUBLISH
    wire: dict[tuple[bool, bool], bytes] | None = None
    #: set when a tap refused it after ``publish()`` returned (the intelligence runtime
    #: queues a scored micro-batch later): its publisher must not be acknowledged even
    #: though the commit future it waits for, shared with the batch, succeeds
    refused: PublishRefused | None = None

    def expired(self, now: float) -> bool:
        """True when the message expiry interval has passed."""
        return self.expires_at is not None and now >= self.expires_at

    def outgoing_properties(self, now: float, sub_ids: tuple[int, ...]) -> Properties:
        """MQTT 5 properties for delivery: remaining expiry, subscription identifiers."""
        props = self.properties
        if self.expires_at is None and not sub_ids:
            return props
        props = dict(props)
        if self.expires_at is not None:
            props["message_expiry_interval"] = max(0, int(self.expires_at - now + 0.999))
        if sub_ids:
            props["subscription_identifier"] = list(sub_ids)
        return props


@dataclass(slots=True, eq=False)
class Delivery:
    """A message on its way to one session: granted QoS, retain flag, subscription ids."""

    message: Message
    qos: int
    retain: bool = False
    sub_ids: tuple[int, ...] = ()
    share: str | None = None  # "$share/group/filter" when routed through a shared subscription
    packet_id: int = 0
    released: bool = False  # QoS 2: PUBREC received, PUBREL sent
    seq: int = 0  # persistence key within the session
    sent: bool = False  # sent at least once: a resend carries DUP


class PublishRefused(Exception):
    """A broker tap refused a message (queue full, disk full); ``reason_code`` for MQTT 5."""

    def __init__(self, reason_code: int, why: str) -> None:
        super().__init__(why)
        self.reason_code = reason_code
