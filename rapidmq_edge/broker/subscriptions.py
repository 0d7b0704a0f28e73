"""Subscription index: exact topics in a dict, wildcard filters in a trie, shared groups.

``match(topic)`` returns, per client, the subscriptions that match (for overlapping
subscriptions the broker delivers once with the maximum QoS and every identifier), and
the shared groups that match (one member of each receives the message).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..mqtt.packets import SubOptions
from ..mqtt.topics import is_wildcard, parse_shared


@dataclass(slots=True, frozen=True)
class Subscription:
    """One client's subscription to one filter."""

    client_id: str
    filter: str  # as subscribed, including any "$share/group/" prefix
    options: SubOptions
    sub_id: int | None = None


@dataclass(slots=True)
class SharedGroup:
    """Members of ``$share/{name}/{filter}``; delivery is round-robin across them."""

    key: str
    members: dict[str, Subscription] = field(default_factory=dict)
    cursor: int = 0


class _Node:
    __slots__ = ("children", "subs", "groups")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, Subscription] = {}
        self.groups: dict[str, SharedGroup] = {}


Match = tuple[dict[str, list[Subscription]], list[SharedGroup]]


class SubscriptionIndex:
    """All subscriptions of the broker, indexed for fast matching."""

    def __init__(self) -> None:
        self._exact: dict[str, dict[str, Subscription]] = {}
        self._exact_groups: dict[str, dict[str, SharedGroup]] = {}
        self._root = _Node()
        self._cache: dict[str, Match] = {}
        self.count = 0
        #: moves with every add / remove (what the broker caches per topic depends on it)
        self.generation = 0

    # -- changes -------------------------------------------------------------------

    def add(self, sub: Subscription) -> bool:
        """Add or replace ``sub``; return True when it replaced an existing one."""
        self._cache.clear()
        self.generation += 1
        filt = sub.filter
        if "+" not in filt and "#" not in filt and not filt.startswith("$share/"):
            subs = self._exact.get(filt)  # the common case: a plain filter, no node to walk
            if subs is None:
                subs = self._exact[filt] = {}
            existed = sub.client_id in subs
            subs[sub.client_id] = sub
            if not existed:
                self.count += 1
            return existed
        group, filt = parse_shared(filt)
        if group is None:
            subs = self._subs_for(filt, create=True)
            assert subs is not None
            existed = sub.client_id in subs
            subs[sub.client_id] = sub
        else:
            groups = self._groups_for(filt, create=True)
            assert groups is not None
            g = groups.get(group)
            if g is None:
                g = groups[group] = SharedGroup(sub.filter)
            existed = sub.client_id in g.members
            g.members[sub.client_id] = sub
        if not existed:
            self.count += 1
        return existed

    def remove(self, client_id: str, full_filter: str) -> bool:
        """Remove one subscription; return True when it existed."""
        self._cache.clear()
        self.generation += 1
        group, filt = parse_shared(full_filter)
        if group is None:
            subs = self._subs_for(filt, create=False)
            if subs is None or subs.pop(client_id, None) is None:
                return False
            if not subs and not is_wildcard(filt):
                del self._exact[filt]
        else:
            groups = self._groups_for(filt, create=False)
            g = groups.get(group) if groups is not None else None
            if g is None or g.members.pop(client_id, None) is None:
                return False
            if not g.members and groups is not None:
                del groups[group]
        self.count -= 1
        return True

    def group(self, full_filter: str) -> SharedGroup | None:
        """The shared group for ``$share/g/f``, if it has members."""
        group, filt = parse_shared(full_filter)
        groups = self._groups_for(filt, create=False)
        return groups.get(group) if groups is not None and group else None

    def _node(self, filt: str, create: bool) -> _Node | None:
        node = self._root
        for level in filt.split("/"):
            nxt = node.children.get(level)
            if nxt is None:
                if not create:
                    return None
                nxt = node.children[level] = _Node()
            node = nxt
        return node

    def _subs_for(self, filt: str, create: bool) -> dict[str, Subscription] | None:
        if not is_wildcard(filt):
            if create:
                return self._exact.setdefault(filt, {})
            return self._exact.get(filt)
        node = self._node(filt, create)
        return node.subs if node is not None else None

    def _groups_for(self, filt: str, create: bool) -> dict[str, SharedGroup] | None:
        if not is_wildcard(filt):
            if create:
                return self._exact_groups.setdefault(filt, {})
            return self._exact_groups.get(filt)
        node = self._node(filt, create)
        return node.groups if node is not None else None

    # -- matching ------------------------------------------------------------------

    def match(self, topic: str) -> Match:
        """Subscriptions matching ``topic``: ({client_id: [subs]}, [shared groups])."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        per_client: dict[str, list[Subscription]] = {}
        groups: list[SharedGroup] = []
        exact = self._exact.get(topic)
        if exact:
            for cid, sub in exact.items():
                per_client[cid] = [sub]
        eg = self._exact_groups.get(topic)
        if eg:
            groups.extend(eg.values())
        if self._root.children:
            levels = topic.split("/")
            self._walk(self._root, levels, 0, topic.startswith("$"), per_client, groups)
        result = (per_client, groups)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(
        self,
        node: _Node,
        levels: list[str],
        i: int,
        dollar: bool,
        out: dict[str, list[Subscription]],
        groups: list[SharedGroup],
    ) -> None:
        wild_ok = not (dollar and i == 0)
        hash_node = node.children.get("#") if wild_ok else None
        if hash_node is not None:
            _collect(hash_node, out, groups)
        if i == len(levels):
            _collect(node, out, groups)
            return
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, dollar, out, groups)
        if wild_ok:
            plus = node.children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, dollar, out, groups)


def _collect(node: _Node, out: dict[str, list[Subscription]], groups: list[SharedGroup]) -> None:
    for cid, sub in node.subs.items():
        lst = out.get(cid)
        if lst is None:
            out[cid] = [sub]
        else:
            lst.append(sub)
    if node.groups:
        groups.extend(node.groups.values())
