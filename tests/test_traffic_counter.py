"""The dashboard's traffic counter: messages and bytes per topic and per publisher, bounded:
once ``max_keys`` keys are counted, new ones count under ``OTHER``."""

from __future__ import annotations

from rapidmq_edge.broker.message import Message
from rapidmq_edge.ops.traffic import OTHER, TrafficCounter


def test_counts_per_topic_and_publisher_within_the_bound() -> None:
    count = TrafficCounter(max_keys=2)
    for topic, origin, payload in (("a", "p1", b"xx"), ("b", "p2", b"y"), ("c", None, b"zzz"),
                                   ("a", "p1", b""), ("d", "p3", b"w")):
        count(Message(topic, payload, origin=origin))
    assert count.topics == {"a": [2, 2], "b": [1, 1], OTHER: [2, 4]}
    assert count.origins == {"p1": [2, 2], "p2": [1, 1], OTHER: [2, 4]}  # "$edge", p3
