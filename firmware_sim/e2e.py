"""Device-side end-to-end encryption for simulated devices (issue 5, item 6).

A device seals each payload with single-shot HPKE (X-Wing) to the cloud recipient
(:func:`rapidmq_edge.crypto.e2e.seal_for_recipient`); the gateway forwards the bytes unchanged
(it routes on topic and metadata only) and only ``rapidmq-edge cloud ingest`` can open them.
The HPKE context binds the device-side topic: ``device_context("", topic)`` (the cloud knows
the topic from the forwarded one minus the gateway's prefix; the device id is not known there).
"""

from __future__ import annotations

from pathlib import Path

from rapidmq_edge.crypto.e2e import device_context, seal_for_recipient
from rapidmq_edge.crypto.keys import RecipientPublicKey
from rapidmq_edge.mqtt.topics import topic_matches

__all__ = ["DeviceSealer"]


class DeviceSealer:
    """Seals payloads of topics matching ``topic_filter`` to one cloud recipient key."""

    def __init__(self, recipient: RecipientPublicKey, topic_filter: str = "#") -> None:
        self.recipient = recipient
        self.topic_filter = topic_filter
        self.sealed = 0

    @classmethod
    def from_file(cls, path: Path, topic_filter: str = "#") -> DeviceSealer:
        """Load the recipient COSE_Key written by ``keys export-public recipient --out``."""
        return cls(RecipientPublicKey.from_cose(path.read_bytes()), topic_filter)

    def seal(self, topic: str, payload: bytes) -> bytes:
        """The payload to publish on ``topic`` (sealed if the topic matches the filter)."""
        if not topic_matches(self.topic_filter, topic):
            return payload
        self.sealed += 1
        return seal_for_recipient(self.recipient, payload, device_context("", topic))
