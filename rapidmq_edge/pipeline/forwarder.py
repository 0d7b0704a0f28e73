"""Forwarding rules: which local messages go to which upstream, under which topic and class.

The forwarder is a broker tap: every message accepted for routing passes through
:meth:`Forwarder.__call__`, which puts a copy in the durable queue for each upstream a
rule sends it to. A refusal (a full ``refuse_new`` class, a full disk) propagates as
:class:`PublishRefused`, so the device is not acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from ..broker.message import FORWARDED_PROPERTIES, Message, PublishRefused
from ..config.forwarding import ForwardRule, UpstreamSettings
from ..mqtt import reasons as rc
from ..mqtt.properties import encode_properties
from ..mqtt.topics import topic_matches
from ..telemetry import RepeatedLog

log = logging.getLogger(__name__)

#: ``Message.origin`` of messages that came down from an upstream (never sent back up)
DOWNSTREAM_ORIGIN = "$upstream:"
#: distinct topics whose matching rules are remembered
TARGET_CACHE_SIZE = 4096


class Queue(Protocol):
    """The part of the durable queue the forwarder uses."""

    def put(
        self, upstream: str, priority: int, topic: str, payload: bytes, qos: int = 1,
        props: bytes = b"", ttl: float | None = None, origin: str | None = None,
    ) -> int: ...


class Protection(Protocol):
    """The protection of ``encrypt``/``sign`` rules (:class:`~.protect.Protector`)."""

    def put(self, rule: ForwardRule, topic: str, payload: bytes, qos: int, props: bytes,
            ttl: float | None, origin: str | None = None) -> int: ...


def _tenant_prefix(prefix: str, tenant: str | None) -> str:
    """A tenant rule's upstream prefix: ``{tenant}`` replaced, else the tenant appended as
    one more level (tenants never share an upstream topic)."""
    if tenant is None:
        return prefix
    if "{tenant}" in prefix:
        return prefix.replace("{tenant}", tenant)
    return prefix + tenant + "/"


class Forwarder:
    """Applies ``[[forward]]`` rules to every local message."""

    def __init__(
        self, gateway_id: str, rules: Sequence[ForwardRule],
        upstreams: Sequence[UpstreamSettings], queue: Queue, protect: Protection | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.queue = queue
        #: seals / signs the messages of ``encrypt`` / ``sign`` rules (None: no such rule)
        self.protect = protect
        prefixes = {u.name: u.topic_prefix for u in upstreams}
        self.rules = [
            (
                r.filter.replace("{gateway_id}", gateway_id),
                r,
                _tenant_prefix(
                    (r.topic_prefix if r.topic_prefix is not None else prefixes[r.upstream])
                    .replace("{gateway_id}", gateway_id), r.tenant),
            )
            for r in rules
        ]
        self.forwarded = 0
        self.refused = 0
        self._repeats = RepeatedLog(log)
        self._refusing: set[str] = set()  # "upstream:error" keys being refused
        #: topic -> targets; devices publish to the same topics over and over
        self._targets: dict[str, list[tuple[ForwardRule, str]]] = {}

    def targets(self, topic: str) -> list[tuple[ForwardRule, str]]:
        """The first matching rule per upstream, with the upstream topic."""
        cached = self._targets.get(topic)
        if cached is not None:
            return cached
        out: dict[str, tuple[ForwardRule, str]] = {}
        for filt, rule, prefix in self.rules:
            if rule.upstream not in out and topic_matches(filt, topic):
                if rule.mount:  # a tenant's rule: its mountpoint is not sent upstream
                    if not topic.startswith(rule.mount):
                        continue  # the mountpoint itself ("#" matches its parent)
                    out[rule.upstream] = (rule, prefix + topic[len(rule.mount):])
                else:
                    out[rule.upstream] = (rule, prefix + topic)
        found = list(out.values())
        if len(self._targets) >= TARGET_CACHE_SIZE:
            self._targets.clear()  # many distinct topics: start over (cheap, rare)
        self._targets[topic] = found
        return found

    def put(self, rule: ForwardRule, priority: int, up_topic: str, payload: bytes,
            props: bytes, ttl: float | None, origin: str | None = None) -> None:
        """Queue one message of ``rule`` in class ``priority``: sealed and / or signed when
        the rule says so; ``props`` are its encoded MQTT properties, ``origin`` its
        publisher's client id. Raises like ``ForwardQueue.put`` (QueueFull, QueueError)."""
        if self.protect is not None and (rule.encrypt or rule.sign):
            if priority != rule.priority:
                rule = replace(rule, priority=priority)
            self.protect.put(rule, up_topic, payload, min(rule.qos, 1), props, ttl, origin)
        else:
            self.queue.put(rule.upstream, priority, up_topic, payload, min(rule.qos, 1), props,
                           ttl, origin)

    def _accepting_again(self, upstream: str) -> None:
        for key in [k for k in self._refusing if k.startswith(upstream + ":")]:
            self._refusing.discard(key)
            self._repeats.clear(key, "queueing for %s again", upstream)

    def rule(self, filt: str, upstream: str) -> ForwardRule | None:
        """The configured rule with this filter and upstream, if any."""
        return next((r for _, r, _ in self.rules if r.filter == filt and r.upstream == upstream),
                    None)

    def __call__(self, msg: Message, scored: int | None = None) -> None:
        """Queue ``msg`` for every upstream a rule sends it to; ``scored`` is the class the
        intelligence runtime chose (used for rules without an explicit ``priority``)."""
        if msg.topic.startswith("$"):
            return  # $SYS and other server topics stay local
        origin = msg.origin or ""
        for rule, up_topic in self.targets(msg.topic):
            if origin == DOWNSTREAM_ORIGIN + rule.upstream:
                continue  # came from this upstream: never echo it back
            props = encode_properties(
                {k: v for k, v in msg.properties.items() if k in FORWARDED_PROPERTIES}
                if msg.properties else None
            )
            ttl = rule.ttl or None
            if msg.expires_at is not None:
                remaining = max(0.0, msg.expires_at - time.time())
                ttl = min(ttl, remaining) if ttl else remaining
            prio = rule.priority if scored is None or rule.priority_explicit else scored
            try:
                self.put(rule, prio, up_topic, msg.payload, props, ttl, msg.origin)
            except Exception as exc:  # QueueFull, QueueError: do not acknowledge
                self.refused += 1
                key = f"{rule.upstream}:{type(exc).__name__}"
                self._refusing.add(key)
                self._repeats(key, logging.WARNING, "not queued for %s (%s): %s", rule.upstream,
                              msg.topic, exc)
                raise PublishRefused(rc.QUOTA_EXCEEDED, str(exc)) from exc
            self.forwarded += 1
            if self._refusing:
                self._accepting_again(rule.upstream)
