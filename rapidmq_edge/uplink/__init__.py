"""Upstream (gateway → cloud) MQTT client fed by the durable queue."""

from .backoff import Backoff
from .client import Outgoing, UplinkClient, UplinkSource

__all__ = ["Backoff", "Outgoing", "UplinkClient", "UplinkSource"]
