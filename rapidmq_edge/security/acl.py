"""Topic access control: ordered allow/deny rules, first match wins.

Rule topics are MQTT filters that may contain ``%u`` (username) and ``%c`` (client id).
A substituted value is always literal text, never a wildcard or level separator; an
*allow* rule is skipped when the username or client id it needs is empty or contains
``/``, ``+`` or ``#``, so a client named ``#`` or ``a/b`` cannot widen a rule.
Unlike MQTT delivery, a rule starting with ``+`` or ``#`` also covers ``$SYS/...`` topics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import AclRule, Config
from ..mqtt.topics import parse_shared, valid_topic_filter

__all__ = ["Acl"]

# NUL never occurs in topic names or filters, so these cannot collide with real levels.
PLUS = "\x00+"
HASH = "\x00#"
_CACHE_SIZE = 10_000

Levels = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Compiled:
    user: str | None  # None = "*"
    levels: Levels  # wildcards as PLUS/HASH; may still contain %u / %c
    templated: bool
    needs_user: bool
    needs_client: bool
    publish: bool
    subscribe: bool
    allow: bool


# (levels, applies to publish, applies to subscribe, allow)
_Bound = tuple[Levels, bool, bool, bool]


def _compile(rule: AclRule) -> _Compiled:
    if not valid_topic_filter(rule.topic):
        raise ValueError(f"invalid ACL topic filter: {rule.topic!r}")
    if rule.action not in ("publish", "subscribe", "all"):
        raise ValueError(f"invalid ACL action: {rule.action!r}")
    if rule.access not in ("allow", "deny"):
        raise ValueError(f"invalid ACL access: {rule.access!r}")
    levels = tuple(
        PLUS if lv == "+" else HASH if lv == "#" else lv for lv in rule.topic.split("/")
    )
    return _Compiled(
        user=None if rule.user == "*" else rule.user,
        levels=levels,
        templated="%u" in rule.topic or "%c" in rule.topic,
        needs_user="%u" in rule.topic,
        needs_client="%c" in rule.topic,
        publish=rule.action in ("publish", "all"),
        subscribe=rule.action in ("subscribe", "all"),
        allow=rule.access == "allow",
    )


def _safe(value: str) -> bool:
    """A placeholder value that is exactly one ordinary topic level."""
    return bool(value) and "/" not in value and "+" not in value and "#" not in value


def match_levels(rule: Levels, target: Sequence[str]) -> bool:
    """Level-wise match where only PLUS/HASH in ``rule`` are wildcards."""
    n = len(target)
    for i, level in enumerate(rule):
        if level == HASH:
            return True
        if i >= n:
            return False
        if level != PLUS and level != target[i]:
            return False
    return len(rule) == n


class Acl:
    """Evaluate publish/subscribe permissions; ``default`` is "allow" or "deny"."""

    def __init__(self, rules: Sequence[AclRule], default: str = "allow") -> None:
        if default not in ("allow", "deny"):
            raise ValueError(f'ACL default must be "allow" or "deny", got {default!r}')
        self._rules = tuple(_compile(r) for r in rules)
        self._default = default == "allow"
        self._cache: dict[tuple[str | None, str], tuple[_Bound, ...]] = {}

    @property
    def restricts_reading(self) -> bool:
        """True when some client may be denied a message its subscription matches."""
        return not self._default or any(
            not r.allow and r.subscribe for r in self._rules
        )

    def can_receive(self, username: str | None, client_id: str, topic: str) -> bool:
        """May this client be sent a message on ``topic`` (the "read" check at delivery)?

        A subscription to ``test/#`` does not carry messages on ``test/secret`` to a client
        that the subscribe rules deny ``test/secret`` (as Mosquitto's read access).
        """
        return self.can_subscribe(username, client_id, topic)

    @classmethod
    def from_config(cls, config: Config) -> Acl:
        """Build from ``config.acl`` and ``config.auth.acl_default``."""
        return cls(config.acl, config.auth.acl_default)

    def _bound(self, username: str | None, client_id: str) -> tuple[_Bound, ...]:
        key = (username, client_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        bound: list[_Bound] = []
        for r in self._rules:
            if r.user is not None and r.user != username:
                continue
            if r.needs_user and username is None:
                continue
            levels = r.levels
            if r.templated:
                user = username or ""
                unsafe = (r.needs_user and not _safe(user)) or (
                    r.needs_client and not _safe(client_id)
                )
                if unsafe and r.allow:
                    continue  # never grant access through a wildcard-like name
                levels = tuple(
                    lv.replace("%u", user).replace("%c", client_id)
                    if lv not in (PLUS, HASH)
                    else lv
                    for lv in levels
                )
            bound.append((levels, r.publish, r.subscribe, r.allow))
        result = tuple(bound)
        if len(self._cache) >= _CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = result
        return result

    def forget(self, username: str | None, client_id: str) -> None:
        """Drop the cached rules of a client (optional; the cache is bounded anyway)."""
        self._cache.pop((username, client_id), None)

    def can_publish(self, username: str | None, client_id: str, topic: str) -> bool:
        """May this client publish to topic name ``topic``?"""
        if not self._rules:
            return self._default
        target = topic.split("/")
        for levels, publish, _sub, allow in self._bound(username, client_id):
            if publish and match_levels(levels, target):
                return allow
        return self._default

    def can_subscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """May this client subscribe to ``filt`` (``$share/group/`` is stripped first)?

        The filter's own ``+``/``#`` are compared as literal level text, so a rule
        ``sensors/#`` covers the filter ``sensors/+/temp`` but a rule ``sensors/a``
        does not cover ``sensors/+``. Malformed shared filters are denied.
        """
        try:
            _group, inner = parse_shared(filt)
        except ValueError:
            return False
        if not self._rules:
            return self._default
        target = inner.split("/")
        for levels, _pub, subscribe, allow in self._bound(username, client_id):
            if subscribe and match_levels(levels, target):
                return allow
        return self._default
