"""MQTT topic names and topic filters: validation and matching (pure functions)."""

from __future__ import annotations

from functools import lru_cache

__all__ = [
    "valid_topic_name",
    "valid_topic_filter",
    "valid_subscription_filter",
    "topic_matches",
    "parse_shared",
    "is_wildcard",
]

MAX_TOPIC_BYTES = 65535


def valid_topic_name(topic: str) -> bool:
    """True when ``topic`` may be published to: non-empty, no wildcards, no NUL."""
    return (
        bool(topic)
        and "+" not in topic
        and "#" not in topic
        and "\x00" not in topic
        and len(topic.encode()) <= MAX_TOPIC_BYTES
    )


def valid_topic_filter(filt: str) -> bool:
    """True when ``filt`` is a well-formed filter: ``+`` fills a level, ``#`` is last."""
    if not filt or "\x00" in filt or len(filt.encode()) > MAX_TOPIC_BYTES:
        return False
    if "+" not in filt and "#" not in filt:  # no wildcard: nothing more to check
        return True
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def valid_subscription_filter(filt: str) -> bool:
    """True when SUBSCRIBE may use ``filt``: a valid filter or ``$share/{group}/{filter}``."""
    if not valid_topic_filter(filt):
        return False
    try:
        group, inner = parse_shared(filt)
    except ValueError:
        return False
    return group is None or valid_topic_filter(inner)


def is_wildcard(filt: str) -> bool:
    """True when the filter contains ``+`` or ``#``."""
    return "+" in filt or "#" in filt


@lru_cache(maxsize=4096)
def _split(s: str) -> tuple[str, ...]:
    return tuple(s.split("/"))


def topic_matches(filt: str, topic: str) -> bool:
    """True when topic name ``topic`` matches filter ``filt``.

    Wildcards at the first level never match topics starting with ``$``
    [MQTT-4.7.2-1].
    """
    if filt == topic:
        return True
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f = _split(filt)
    t = _split(topic)
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def parse_shared(filt: str) -> tuple[str | None, str]:
    """Split ``$share/{group}/{filter}`` into (group, filter); (None, filt) otherwise.

    Raises ValueError when the shared form is malformed.
    """
    if not filt.startswith("$share/"):
        return None, filt
    parts = filt.split("/", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ValueError("malformed shared subscription")
    group = parts[1]
    if "+" in group or "#" in group:
        raise ValueError("shared subscription group contains a wildcard")
    return group, parts[2]
