"""Downstream: what an upstream sends the gateway (``[[downstream]]``), published locally.

One :class:`Downstream` per upstream is the uplink client's ``on_message``: a message on a
subscribed upstream topic is published to the local broker under its local topic (the
rule's ``strip_prefix`` removed, ``local_prefix`` added) with the rule's QoS at most, and
marked with :data:`~.forwarder.DOWNSTREAM_ORIGIN` so the forwarder never sends it back up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from ..broker.broker import Broker
from ..broker.message import Message, PublishRefused
from ..config.forwarding import DownstreamRule
from ..mqtt.topics import topic_matches
from .forwarder import DOWNSTREAM_ORIGIN

__all__ = ["Downstream"]

log = logging.getLogger(__name__)


class Downstream:
    """The ``[[downstream]]`` rules of one upstream, applied to what it sends."""

    def __init__(self, broker: Broker, upstream: str, rules: Sequence[DownstreamRule],
                 gateway_id: str) -> None:
        self.broker = broker
        self.upstream = upstream

        def sub(text: str) -> str:
            return text.replace("{gateway_id}", gateway_id)

        #: (filter, strip prefix, local prefix, qos) with ``{gateway_id}`` filled in
        self.rules = [(sub(r.filter), sub(r.strip_prefix), r.local_prefix, r.qos)
                      for r in rules if r.upstream == upstream]

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, QoS) the uplink subscribes to."""
        return [(filt, qos) for filt, _, _, qos in self.rules]

    def __call__(self, topic: str, payload: bytes, qos: int, props: dict[str, Any]) -> None:
        """Publish an upstream message locally per the first rule matching its topic."""
        for filt, strip, local_prefix, rule_qos in self.rules:
            if not topic_matches(filt, topic):
                continue
            if strip:
                if not topic.startswith(strip):
                    continue
                rest = topic[len(strip):]
            else:
                rest = topic
            if not rest:
                continue
            local = local_prefix + rest
            expiry = props.pop("message_expiry_interval", None)
            msg = Message(
                local, payload, min(qos, rule_qos), False, props,
                time.time() + expiry if expiry is not None else None,
                DOWNSTREAM_ORIGIN + self.upstream,
            )
            try:
                self.broker.publish(msg)
            except PublishRefused as exc:
                log.warning("downstream message on %s refused: %s", local, exc)
            return
