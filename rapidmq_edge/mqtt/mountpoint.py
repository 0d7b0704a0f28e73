"""Invisible mountpoints: a client's topic tree placed below a prefix of the broker's.

A client with a mountpoint (a tenant's, e.g. ``tenants/acme/``) names topics as if the
mountpoint were the root: what it sends is moved below the mountpoint
(:meth:`TenantMount.inbound`, :meth:`TenantMount.filter`) and what it receives has the
mountpoint taken off (:meth:`TenantMount.outbound`). Sans-I/O; the broker connection, CoAP
and the HTTP API call it where topics enter and leave, only for clients that have one.
"""

from __future__ import annotations

from collections.abc import Iterable

from .packets import Will
from .properties import Properties
from .topics import parse_shared, topic_matches, valid_subscription_filter

__all__ = ["TenantMount"]

_SHARE = "$share/"


class TenantMount:
    """The rewrite of one mountpoint (``prefix``: topic levels ending with ``/``)."""

    __slots__ = ("prefix", "_cut")

    def __init__(self, prefix: str) -> None:
        if not prefix.endswith("/") or prefix.startswith("$"):
            raise ValueError(f"a mountpoint ends with / and does not start with $: {prefix!r}")
        self.prefix = prefix
        self._cut = len(prefix)

    def __repr__(self) -> str:
        return f"TenantMount({self.prefix!r})"

    def inbound(self, topic: str) -> str:
        """The broker's name of a topic the client names (``sensors/t`` ->
        ``tenants/acme/sensors/t``); ``$SYS/...`` becomes the mountpoint's ``$SYS`` view."""
        return self.prefix + topic

    def outbound(self, topic: str) -> str | None:
        """The client's name of a broker topic; None when it is outside the mountpoint
        (such a message is not the client's to see)."""
        if topic.startswith(self.prefix) and len(topic) > self._cut:
            return topic[self._cut:]
        return None

    def filter(self, filt: str) -> str:
        """The broker's filter for a client's subscription filter: ``#`` ->
        ``tenants/acme/#``, ``$share/g/+/t`` -> ``$share/g/tenants/acme/+/t``. An invalid
        filter is returned as it is (the subscription is refused as invalid)."""
        if not valid_subscription_filter(filt):
            return filt
        if filt.startswith(_SHARE):
            try:
                group, inner = parse_shared(filt)
            except ValueError:
                return filt
            return f"{_SHARE}{group}/{self.prefix}{inner}"
        return self.prefix + filt

    def unfilter(self, filt: str) -> str | None:
        """The client's inner filter of a mounted subscription filter (``$share/g/``
        dropped); None when it is not below the mountpoint."""
        try:
            _group, inner = parse_shared(filt)
        except ValueError:
            return None
        return inner[self._cut:] if inner.startswith(self.prefix) else None

    def matched_by(self, outer: str, filters: Iterable[str]) -> bool:
        """Does one of the client's mounted ``filters`` match ``outer`` as the client wrote
        it? Below the mountpoint, ``tenants/acme/#`` matches ``tenants/acme/$SYS/...``
        although ``#`` does not match ``$SYS/...`` [MQTT-4.7.2-1]: asked for topics
        starting with ``$`` before they are delivered."""
        for f in filters:
            inner = self.unfilter(f)
            if inner is not None and topic_matches(inner, outer):
                return True
        return False

    def inbound_properties(self, props: Properties) -> Properties:
        """PUBLISH / Will properties with a Response Topic moved below the mountpoint."""
        rt = props.get("response_topic")
        if rt is None:
            return props
        return {**props, "response_topic": self.prefix + rt}

    def outbound_properties(self, props: Properties) -> Properties:
        """Properties with a Response Topic below the mountpoint given the client's name
        (one elsewhere is left as it is)."""
        rt = props.get("response_topic")
        if rt is None:
            return props
        outer = self.outbound(rt)
        return props if outer is None else {**props, "response_topic": outer}

    def will(self, will: Will) -> Will:
        """A CONNECT's Will Message published below the mountpoint."""
        return Will(self.inbound(will.topic), will.payload, will.qos, will.retain,
                    self.inbound_properties(will.properties))
