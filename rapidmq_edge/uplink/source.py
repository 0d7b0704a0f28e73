"""The queue side of the uplink: what :class:`~.client.UplinkClient` drains.

Delivery contract with the :class:`UplinkSource` (the durable queue):

* ``fetch(upstream, limit)`` leases up to ``limit`` messages (oldest first) and returns them;
  leased messages are not returned again until acked or requeued.
* ``ack(upstream, ids)`` is called once the server acknowledged the messages (PUBACK, PUBCOMP;
  QoS 0 right after the write); acks are batched per read chunk.
* ``requeue(upstream, ids)`` returns leased messages: on connection loss (everything in
  flight, resent later as new PUBLISHes: at-least-once, duplicates only of the same id) and
  ``nack_delay`` seconds after a v5 PUBACK/PUBREC with a reason code >= 0x80.
* ``drop(upstream, ids, reason)`` removes leased messages that can never be sent (reason
  ``too_large``: above the MQTT 5 server's Maximum Packet Size); the rest keeps flowing.
* ``wait_for_data(upstream)`` returns a fresh awaitable (e.g. a coroutine) that completes when
  ``fetch`` may return something. The client cancels it on timeout or disconnect and also
  polls every ``poll_interval`` seconds, so a missed wake-up only costs latency.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Outgoing", "OutgoingMessage", "UplinkSource"]


@dataclass(slots=True)
class Outgoing:
    """One queued message; ``id`` is the queue's stable id."""

    id: int
    topic: str
    payload: bytes
    qos: int = 1
    props: bytes = b""  # encoded MQTT 5 property block (length prefix included), or empty
    retain: bool = False


class OutgoingMessage(Protocol):
    """What the client reads of a fetched message (an :class:`Outgoing` or the queue's own
    message type with the same fields)."""

    @property
    def id(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def props(self) -> bytes: ...
    @property
    def retain(self) -> bool: ...


class UplinkSource(Protocol):
    """What the client needs from the queue (see the module docstring for the contract)."""

    def fetch(self, upstream: str, limit: int) -> Sequence[OutgoingMessage]: ...

    def ack(self, upstream: str, ids: list[int]) -> None: ...

    def requeue(self, upstream: str, ids: list[int]) -> None: ...

    def drop(self, upstream: str, ids: list[int], reason: str) -> None: ...

    def wait_for_data(self, upstream: str) -> Awaitable[None]: ...
