"""Role-based access control: the model and its decisions (pure, no I/O).

Subjects are users (by user name) and clients (by client id); both may belong to groups and
hold roles directly, and groups hold roles. A client without a user name is in the built-in
group ``anonymous``. A role is an ordered list of rules; every rule that applies to a
subject is tried in order of descending ``priority`` (ties: the role's name, then the rule's
position in it) and the first one that matches decides. Nothing matching means **deny**.

Rule types are Mosquitto dynamic-security's ACL types: ``publishClientSend`` (a client's
PUBLISH), ``publishClientReceive`` (a message delivered to it), ``subscribeLiteral`` (the
filter equals the rule's topic), ``subscribePattern`` (the rule's filter covers the filter),
``unsubscribeLiteral`` / ``unsubscribePattern``. Qualifiers narrow a rule: ``qos`` (the QoS
levels it applies to), ``retain`` (``any`` / ``true`` / ``false``) and ``shared`` (``any`` /
``only`` / ``never``: ``$share/...`` subscriptions). A rule whose qualifier cannot be
checked (the caller did not say the QoS) applies if it denies and is skipped if it allows.

The receive check (at delivery, so a revoked role stops a subscription's messages at once)
tries ``publishClientReceive`` and both subscribe types, the topic name against their topics.

Topics may hold placeholders ``${clientid}``, ``${username}``, ``${tenant}``,
``${cert_cn}`` (and ``%c`` / ``%u`` of the ``[[acl]]`` table). A substituted value is literal
text: an *allow* rule is skipped when a value it needs is empty or holds ``/``, ``+``, ``#``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..mqtt.topics import parse_shared, valid_topic_filter
from .acl import HASH, PLUS, Levels, match_levels

__all__ = [
    "ANONYMOUS",
    "CONFIG_ROLE",
    "RULE_TYPES",
    "Identity",
    "RbacError",
    "RbacModel",
    "RbacPolicy",
    "Role",
    "Rule",
    "acl_role",
    "parse_rule",
]

#: the group every client without a user name belongs to
ANONYMOUS = "anonymous"
#: the role the ``[[acl]]`` table becomes (tried before every stored role)
CONFIG_ROLE = "config-acl"

SEND = "publishClientSend"
RECEIVE = "publishClientReceive"
SUB_LITERAL = "subscribeLiteral"
SUB_PATTERN = "subscribePattern"
UNSUB_LITERAL = "unsubscribeLiteral"
UNSUB_PATTERN = "unsubscribePattern"
RULE_TYPES = (SEND, RECEIVE, SUB_LITERAL, SUB_PATTERN, UNSUB_LITERAL, UNSUB_PATTERN)
_RETAIN = ("any", "true", "false")
_SHARED = ("any", "only", "never")
_NAME_RE = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
_PLACEHOLDERS = {"${clientid}": "c", "${username}": "u", "${tenant}": "t", "${cert_cn}": "n",
                 "%c": "c", "%u": "u"}
_PH_RE = re.compile(r"\$\{[a-z_]*\}")
_PRIORITY_LIMIT = 1_000_000
_CACHE_SIZE = 65_536


class RbacError(ValueError):
    """A role, group or assignment that is malformed or names something unknown."""


def valid_name(name: str) -> bool:
    """Role and group names: 1-64 characters of ``A-Z a-z 0-9 . _ : @ -``."""
    return _NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of a role. ``user`` only for the ``[[acl]]`` mapping (None: anyone)."""

    type: str
    topic: str
    allow: bool
    priority: int = 0
    qos: frozenset[int] = frozenset({0, 1, 2})
    retain: str = "any"
    shared: str = "any"
    user: str | None = None

    def describe(self) -> str:
        """One line: ``allow subscribePattern a/# priority 5 qos 0,1``."""
        parts = ["allow" if self.allow else "deny", self.type, self.topic,
                 f"priority {self.priority}"]
        if self.qos != frozenset({0, 1, 2}):
            parts.append("qos " + ",".join(str(q) for q in sorted(self.qos)))
        if self.retain != "any":
            parts.append(f"retain {self.retain}")
        if self.shared != "any":
            parts.append(f"shared {self.shared}")
        return " ".join(parts)


def parse_rule(type_: str, topic: str, access: str, priority: int = 0,
               qos: Iterable[int] | None = None, retain: str = "any",
               shared: str = "any") -> Rule:
    """A checked rule (raises RbacError naming the bad field)."""
    if type_ not in RULE_TYPES:
        raise RbacError(f"unknown rule type {type_!r} (use one of {', '.join(RULE_TYPES)})")
    if access not in ("allow", "deny"):
        raise RbacError(f'rule access must be "allow" or "deny", got {access!r}')
    if not isinstance(priority, int) or not -_PRIORITY_LIMIT < priority < _PRIORITY_LIMIT:
        raise RbacError(f"rule priority must be an integer of at most 6 digits, got {priority!r}")
    for ph in _PH_RE.findall(topic):
        if ph not in _PLACEHOLDERS:
            raise RbacError(f"unknown placeholder {ph} in {topic!r} (use ${{clientid}}, "
                            "${username}, ${tenant}, ${cert_cn})")
    if not valid_topic_filter(topic) or topic.startswith("$share/"):
        raise RbacError(f"rule topic must be an MQTT topic filter without $share/, "
                        f"got {topic!r}")
    levels = frozenset({0, 1, 2}) if qos is None else frozenset(qos)
    if not levels or not levels <= {0, 1, 2}:
        raise RbacError(f"rule qos must be a non-empty subset of 0,1,2, got {sorted(levels)}")
    if retain not in _RETAIN:
        raise RbacError(f"rule retain must be any, true or false, got {retain!r}")
    if shared not in _SHARED:
        raise RbacError(f"rule shared must be any, only or never, got {shared!r}")
    return Rule(type_, topic, access == "allow", priority, levels, retain, shared)


@dataclass(frozen=True, slots=True)
class Role:
    """A named, ordered list of rules."""

    name: str
    rules: tuple[Rule, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class RbacModel:
    """Everything stored: roles, groups and who holds what. Immutable; edits return copies.

    ``members``: group -> (("user" | "client", name), ...); ``grants``: subject
    (("user" | "client" | "group", name)) -> role names.
    """

    roles: Mapping[str, Role] = field(default_factory=dict)
    groups: frozenset[str] = frozenset({ANONYMOUS})
    members: Mapping[str, frozenset[tuple[str, str]]] = field(default_factory=dict)
    grants: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    # -- checks ------------------------------------------------------------------------

    def _role(self, name: str) -> Role:
        role = self.roles.get(name)
        if role is None:
            raise RbacError(f"unknown role: {name}")
        return role

    def _group(self, name: str) -> None:
        if name not in self.groups:
            raise RbacError(f"unknown group: {name}")

    @staticmethod
    def _subject(kind: str, name: str) -> None:
        if kind not in ("user", "client", "group"):
            raise RbacError(f"a subject is a user, client or group, got {kind!r}")
        if not name or len(name) > 256 or not name.isprintable():
            raise RbacError(f"invalid {kind} name: {name!r}")

    def validate(self) -> RbacModel:
        """Raise RbacError when anything names an unknown role or group; else self."""
        for name, role in self.roles.items():
            if not valid_name(name) or role.name != name:
                raise RbacError(f"invalid role name: {name!r}")
        for g in self.groups:
            if not valid_name(g):
                raise RbacError(f"invalid group name: {g!r}")
        if ANONYMOUS not in self.groups:
            raise RbacError(f"the group {ANONYMOUS} cannot be removed")
        for g in self.members:
            self._group(g)
        for (kind, name), roles in self.grants.items():
            self._subject(kind, name)
            if kind == "group":
                self._group(name)
            for r in roles:
                self._role(r)
        return self

    # -- edits (each returns a new, validated model) --------------------------------------

    def put_role(self, role: Role) -> RbacModel:
        """Create or replace a role."""
        if not valid_name(role.name):
            raise RbacError(f"invalid role name: {role.name!r} (use A-Z a-z 0-9 . _ : @ -)")
        if role.name == CONFIG_ROLE:
            raise RbacError(f"{CONFIG_ROLE} is the [[acl]] table's role; edit the config")
        return replace(self, roles={**self.roles, role.name: role}).validate()

    def delete_role(self, name: str) -> RbacModel:
        """Remove a role and every grant of it."""
        self._role(name)
        roles = {k: v for k, v in self.roles.items() if k != name}
        grants = {s: tuple(r for r in rs if r != name) for s, rs in self.grants.items()}
        return replace(self, roles=roles, grants={s: rs for s, rs in grants.items() if rs})

    def add_rule(self, role: str, rule: Rule) -> RbacModel:
        """Append a rule to a role."""
        r = self._role(role)
        return self.put_role(replace(r, rules=(*r.rules, rule)))

    def remove_rule(self, role: str, index: int) -> RbacModel:
        """Remove the rule at ``index`` (0-based, as ``role show`` numbers them)."""
        r = self._role(role)
        if not 0 <= index < len(r.rules):
            raise RbacError(f"role {role} has no rule {index} (it has {len(r.rules)})")
        return self.put_role(replace(r, rules=r.rules[:index] + r.rules[index + 1:]))

    def add_group(self, name: str) -> RbacModel:
        """Create a group (idempotent)."""
        if not valid_name(name):
            raise RbacError(f"invalid group name: {name!r} (use A-Z a-z 0-9 . _ : @ -)")
        return replace(self, groups=self.groups | {name})

    def delete_group(self, name: str) -> RbacModel:
        """Remove a group, its members and its roles."""
        self._group(name)
        if name == ANONYMOUS:
            raise RbacError(f"the group {ANONYMOUS} is built in and cannot be removed")
        members = {g: m for g, m in self.members.items() if g != name}
        grants = {s: r for s, r in self.grants.items() if s != ("group", name)}
        return replace(self, groups=self.groups - {name}, members=members, grants=grants)

    def join(self, group: str, kind: str, name: str, member: bool = True) -> RbacModel:
        """Add (``member``) or remove a user or client to / from a group."""
        self._group(group)
        if kind not in ("user", "client"):
            raise RbacError(f"a group member is a user or a client, got {kind!r}")
        self._subject(kind, name)
        now = self.members.get(group, frozenset())
        new = now | {(kind, name)} if member else now - {(kind, name)}
        if not member and new == now:
            raise RbacError(f"{kind} {name} is not in group {group}")
        return replace(self, members={**self.members, group: new})

    def grant(self, kind: str, name: str, role: str, granted: bool = True) -> RbacModel:
        """Give (``granted``) or take a role to / from a user, client or group."""
        self._subject(kind, name)
        self._role(role)
        if kind == "group":
            self._group(name)
        now = self.grants.get((kind, name), ())
        if granted:
            new = now if role in now else (*now, role)
        else:
            if role not in now:
                raise RbacError(f"{kind} {name} does not hold role {role}")
            new = tuple(r for r in now if r != role)
        grants = {**self.grants, (kind, name): new}
        return replace(self, grants={s: r for s, r in grants.items() if r})

    # -- questions -----------------------------------------------------------------------

    def groups_of(self, username: str | None, client_id: str) -> list[str]:
        """Sorted groups of a connected client (``anonymous`` without a user name)."""
        out = {ANONYMOUS} if username is None else set()
        for g, members in self.members.items():
            if ("client", client_id) in members or (
                    username is not None and ("user", username) in members):
                out.add(g)
        return sorted(out)

    def roles_of(self, username: str | None, client_id: str) -> list[str]:
        """Sorted names of every role a connected client holds, directly or by group."""
        subjects = [("client", client_id)]
        if username is not None:
            subjects.append(("user", username))
        subjects += [("group", g) for g in self.groups_of(username, client_id)]
        return sorted({r for s in subjects for r in self.grants.get(s, ())})


def acl_role(entries: Sequence[tuple[str, str, str, str]]) -> Role:
    """The ``[[acl]]`` table as the role ``config-acl`` (user, topic, action, access each).

    ``publish`` becomes ``publishClientSend``, ``subscribe`` ``subscribePattern`` (which also
    governs delivery), ``all`` both; ``user = "*"`` applies to everyone. File order is kept.
    """
    rules: list[Rule] = []
    for user, topic, action, access in entries:
        who = None if user == "*" else user
        types = {"publish": (SEND,), "subscribe": (SUB_PATTERN,)}.get(action, (SEND, SUB_PATTERN))
        rules += [Rule(t, topic, access == "allow", user=who) for t in types]
    return Role(CONFIG_ROLE, tuple(rules), "the [[acl]] table of the config")


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Identity:
    """Who asks: what placeholders are replaced with."""

    username: str | None
    client_id: str
    tenant: str | None = None
    cert_cn: str | None = None


def _safe(value: str | None) -> bool:
    return value is not None and value != "" and not any(c in value for c in "/+#")


def _levels(topic: str) -> Levels:
    return tuple(PLUS if lv == "+" else HASH if lv == "#" else lv for lv in topic.split("/"))


# a bound rule: (order, levels, literal topic, allow, qos, retain, shared)
_Bound = tuple[int, Levels, str, bool, frozenset[int], str, str]


class _Table:
    """The bound rules of one rule kind for one identity, in order, indexed by their first
    level, or (first level ``+``) by their second."""

    __slots__ = ("by_first", "by_second", "wild")

    def __init__(self, rules: list[_Bound]) -> None:
        self.by_first: dict[str, list[_Bound]] = {}
        self.by_second: dict[str, list[_Bound]] = {}
        self.wild: list[_Bound] = []
        for b in rules:
            levels = b[1]
            if levels[0] not in (PLUS, HASH):
                self.by_first.setdefault(levels[0], []).append(b)
            elif levels[0] == PLUS and len(levels) > 1 and levels[1] not in (PLUS, HASH):
                self.by_second.setdefault(levels[1], []).append(b)
            else:
                self.wild.append(b)

    def buckets(self, target: list[str]) -> tuple[Sequence[_Bound], ...]:
        """The rules that can match ``target`` (each list in order)."""
        first = self.by_first.get(target[0], ())
        second = self.by_second.get(target[1], ()) if len(target) > 1 else ()
        return first, second, self.wild


def _qualifies(b: _Bound, qos: int | None, retain: bool | None, shared: bool | None) -> bool:
    allow = b[3]
    if b[4] != _ALL_QOS:
        if qos is None:
            return not allow
        if qos not in b[4]:
            return False
    if b[5] != "any":
        if retain is None:
            return not allow
        if retain != (b[5] == "true"):
            return False
    return b[6] == "any" or shared is None or shared == (b[6] == "only")


_ALL_QOS = frozenset({0, 1, 2})
_KINDS = {SEND: "send", RECEIVE: "receive", SUB_LITERAL: "sub_literal",
          SUB_PATTERN: "sub_pattern", UNSUB_LITERAL: "unsub_literal",
          UNSUB_PATTERN: "unsub_pattern"}


class _Tables:
    """Every rule kind's table for one identity."""

    __slots__ = ("send", "receive", "sub_literal", "sub_pattern", "unsub_literal",
                 "unsub_pattern")

    def __init__(self, tables: dict[str, list[_Bound]]) -> None:
        self.send = _Table(tables.get("send", []))
        self.sub_literal = _Table(tables.get("sub_literal", []))
        self.sub_pattern = _Table(tables.get("sub_pattern", []))
        self.unsub_literal = _Table(tables.get("unsub_literal", []))
        self.unsub_pattern = _Table(tables.get("unsub_pattern", []))
        # delivery: receive and both subscribe kinds in one table, each rule's topic as a
        # filter over the topic name. Qualifiers were checked when the message was
        # published / the subscription made: a qualified allow applies here as it is, a
        # qualified deny (it denied only some publishes / subscriptions) does not.
        recv: list[_Bound] = []
        for kind in ("receive", "sub_pattern", "sub_literal"):
            for b in tables.get(kind, []):
                qualified = b[4] != _ALL_QOS or b[5] != "any" or b[6] != "any"
                if qualified and not b[3]:
                    continue
                recv.append((b[0], b[1], b[2], b[3], _ALL_QOS, "any", "any"))
        recv.sort(key=lambda b: b[0])
        self.receive = _Table(recv)


@dataclass(slots=True)
class _Compiled:
    entries: list[tuple[str, Rule, _Bound | None]]
    shared: _Tables | None


def _group_kinds(entries: list[tuple[str, Rule, _Bound | None]],
                 values: dict[str, str | None]) -> dict[str, list[_Bound]]:
    """Bound rules per kind, in order; placeholders replaced from ``values``."""
    tables: dict[str, list[_Bound]] = {}
    for order, (kind, rule, bound) in enumerate(entries):
        if bound is None:
            topic = rule.topic
            skip = False
            for ph, key in _PLACEHOLDERS.items():
                if ph in topic:
                    value = values.get(key)
                    if not _safe(value):
                        if rule.allow:
                            skip = True  # never grant access through a wildcard-like value
                            break
                        value = "\x00"  # a deny still applies, matching nothing real
                    topic = topic.replace(ph, value or "")
            if skip:
                continue
            bound = (order, _levels(topic), topic, rule.allow, rule.qos, rule.retain,
                     rule.shared)
        tables.setdefault(kind, []).append(bound)
    return tables


class RbacPolicy:
    """The decisions of one :class:`RbacModel` (plus the ``[[acl]]`` role), cached.

    ``generation`` identifies the rules; a new policy is built when they change, so caches
    keyed by it are invalidated with it.
    """

    def __init__(self, model: RbacModel, config_role: Role | None = None,
                 generation: int = 0,
                 tenant_of: Callable[[str | None], str | None] | None = None,
                 cert_cn_of: Callable[[str], str | None] | None = None) -> None:
        self.model = model
        self.config_role = config_role
        self.generation = generation
        self._identities: dict[tuple[str | None, str], _Tables] = {}
        self._compiled: dict[tuple[tuple[str, ...], str | None], _Compiled] = {}
        self._user_rules = config_role is not None and any(
            r.user is not None for r in config_role.rules)
        self._decisions: dict[tuple[object, ...], bool] = {}
        self._tenant_of = tenant_of
        self._cert_cn_of = cert_cn_of  # client id -> its TLS client certificate's CN
        self.rule_count = sum(len(r.rules) for r in model.roles.values()) + (
            len(config_role.rules) if config_role else 0)

    def identity(self, username: str | None, client_id: str) -> Identity:
        """The placeholders of a client."""
        tenant = self._tenant_of(username) if self._tenant_of is not None else None
        cn = self._cert_cn_of(client_id) if self._cert_cn_of is not None else None
        return Identity(username, client_id, tenant, cn)

    def _ordered(self, username: str | None, roles: Sequence[str]) -> list[Rule]:
        out: list[tuple[int, int, str, int, Rule]] = []
        if self.config_role is not None:
            for i, rule in enumerate(self.config_role.rules):
                if rule.user is None or rule.user == username:
                    out.append((0, 0, "", i, rule))
        for name in roles:
            for i, rule in enumerate(self.model.roles[name].rules):
                out.append((1, -rule.priority, name, i, rule))
        out.sort(key=lambda t: t[:4])
        return [t[4] for t in out]

    def _compile(self, username: str | None, roles: tuple[str, ...]) -> _Compiled:
        """The ordered rules of a role set: bound once unless they hold placeholders."""
        key = (roles, username if self._user_rules else None)
        hit = self._compiled.get(key)
        if hit is None:
            entries: list[tuple[str, Rule, _Bound | None]] = []
            for order, rule in enumerate(self._ordered(username, roles)):
                templated = "$" in rule.topic or "%" in rule.topic
                bound = None if templated else (order, _levels(rule.topic), rule.topic,
                                                rule.allow, rule.qos, rule.retain, rule.shared)
                entries.append((_KINDS[rule.type], rule, bound))
            shared = None
            if all(b is not None for _k, _r, b in entries):
                shared = _Tables(_group_kinds(entries, {}))
            if len(self._compiled) >= _CACHE_SIZE // 8:
                del self._compiled[next(iter(self._compiled))]
            hit = self._compiled[key] = _Compiled(entries, shared)
        return hit

    def _bind(self, username: str | None, client_id: str) -> _Tables:
        compiled = self._compile(username, tuple(self.model.roles_of(username, client_id)))
        if compiled.shared is not None:
            return compiled.shared  # no placeholders: every client of the role set shares it
        ident = self.identity(username, client_id)
        values = {"c": ident.client_id, "u": ident.username, "t": ident.tenant,
                  "n": ident.cert_cn}
        return _Tables(_group_kinds(compiled.entries, values))

    def _rules(self, username: str | None, client_id: str) -> _Tables:
        key = (username, client_id)
        hit = self._identities.get(key)
        if hit is None:
            if len(self._identities) >= _CACHE_SIZE // 8:
                del self._identities[next(iter(self._identities))]
            hit = self._identities[key] = self._bind(username, client_id)
        return hit

    def _remember(self, key: tuple[object, ...], allowed: bool) -> bool:
        d = self._decisions
        if len(d) >= _CACHE_SIZE:
            del d[next(iter(d))]
        d[key] = allowed
        return allowed

    def forget(self, client_id: str) -> None:
        """Its identity changed (another certificate): bind its rules again, drop decisions."""
        for key in [k for k in self._identities if k[1] == client_id]:
            del self._identities[key]
        self._decisions.clear()

    def can_publish(self, username: str | None, client_id: str, topic: str,
                    qos: int | None = None, retain: bool | None = None) -> bool:
        """May this client publish to ``topic`` (with this QoS and retain flag)?"""
        key = ("p", username, client_id, topic, qos, retain)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        got = _first_order(self._rules(username, client_id).send, topic.split("/"), None, qos,
                           retain)
        return self._remember(key, got is not None and got[1])

    def can_subscribe(self, username: str | None, client_id: str, filt: str,
                      qos: int | None = None) -> bool:
        """May this client subscribe to ``filt`` (``$share/g/`` stripped; qualifiers kept)?"""
        key = ("s", username, client_id, filt, qos)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        try:
            group, inner = parse_shared(filt)
        except ValueError:
            return False
        rules = self._rules(username, client_id)
        target = inner.split("/")
        shared = group is not None
        # literal and pattern rules compete by order: the earlier match decides
        lit = _first_of(rules.sub_literal, rules.sub_pattern, target, inner, qos, shared)
        return self._remember(key, lit is True)

    def can_unsubscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """May this client unsubscribe ``filt``? Allowed unless a rule denies (as dynsec)."""
        try:
            _group, inner = parse_shared(filt)
        except ValueError:
            return True
        rules = self._rules(username, client_id)
        got = _first_of(rules.unsub_literal, rules.unsub_pattern, inner.split("/"), inner,
                        None, None)
        return got is not False

    def can_receive(self, username: str | None, client_id: str, topic: str) -> bool:
        """May a message on ``topic`` be delivered to this client (checked at delivery)?"""
        key = ("r", username, client_id, topic)
        hit = self._decisions.get(key)
        if hit is not None:
            return hit
        got = _first_order(self._rules(username, client_id).receive, topic.split("/"), None)
        return self._remember(key, got is not None and got[1])


def _first_order(table: _Table, target: list[str], literal: str | None,
                 qos: int | None = None, retain: bool | None = None,
                 shared: bool | None = None) -> tuple[int, bool] | None:
    """(order, allow) of the first matching rule of ``table``."""
    best: _Bound | None = None
    for bucket in table.buckets(target):
        for b in bucket:
            if best is not None and b[0] >= best[0]:
                break
            if literal is not None:
                if b[2] != literal:
                    continue
            elif not match_levels(b[1], target):
                continue
            if not _qualifies(b, qos, retain, shared):
                continue
            best = b
            break
    return None if best is None else (best[0], best[3])


def _first_of(literal: _Table, pattern: _Table, target: list[str], filt: str,
              qos: int | None, shared: bool | None) -> bool | None:
    a = _first_order(literal, target, filt, qos, None, shared)
    b = _first_order(pattern, target, None, qos, None, shared)
    if a is None:
        return None if b is None else b[1]
    if b is None or a[0] < b[0]:
        return a[1]
    return b[1]
