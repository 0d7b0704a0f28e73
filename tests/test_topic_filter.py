"""``valid_topic_filter``'s wildcard-free shortcut decides exactly as the level-by-level rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rapidmq_edge.mqtt.topics import MAX_TOPIC_BYTES, valid_topic_filter


def _by_levels(filt: str) -> bool:
    """The rules level by level (MQTT-4.7.1), without any shortcut."""
    if not filt or "\x00" in filt or len(filt.encode()) > MAX_TOPIC_BYTES:
        return False
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="ab/+#\x00é", max_size=12))
def test_same_decision_as_the_level_rules(filt: str) -> None:
    assert valid_topic_filter(filt) == _by_levels(filt)


def test_examples() -> None:
    for good in ("a", "a/b", "/", "a//b", "+", "#", "a/+/b", "a/#", "+/+", "é/ü"):
        assert valid_topic_filter(good), good
    for bad in ("", "a#", "a/#/b", "a+", "a/b+", "a\x00b", "x" * (MAX_TOPIC_BYTES + 1)):
        assert not valid_topic_filter(bad), bad
