"""RBAC decisions (rbac.py), the SQLite store and the role / group / user commands."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rapidmq_edge.config import AclRule, ConfigError, parse_config
from rapidmq_edge.security.acl import Acl
from rapidmq_edge.security.rbac import (
    RbacError,
    RbacModel,
    RbacPolicy,
    Role,
    acl_role,
    parse_rule,
)
from rapidmq_edge.security.rbac_live import LiveRbac
from rapidmq_edge.security.rbac_store import RbacStore, apply_role_file


def _model(*roles: Role) -> RbacModel:
    m = RbacModel()
    for r in roles:
        m = m.put_role(r)
    return m


def _role(name: str, *rules: tuple[str, str, str] | tuple[str, str, str, int]) -> Role:
    return Role(name, tuple(parse_rule(*r) for r in rules))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decisions


def test_default_deny_outside_a_role() -> None:
    m = _model(_role("w", ("publishClientSend", "a/#", "allow")))
    p = RbacPolicy(m)
    assert not p.can_publish("alice", "c1", "a/b")  # the role exists but alice lacks it
    assert not p.can_subscribe("alice", "c1", "a/#")
    assert not p.can_receive("alice", "c1", "a/b")
    p = RbacPolicy(m.grant("user", "alice", "w"))
    assert p.can_publish("alice", "c1", "a/b")
    assert not p.can_publish("alice", "c1", "b")
    assert not p.can_publish("bob", "c2", "a/b")


def test_priority_then_first_match() -> None:
    role = _role("r", ("publishClientSend", "a/#", "allow", 1),
                 ("publishClientSend", "a/secret", "deny", 5),
                 ("publishClientSend", "a/#", "deny", 1))
    p = RbacPolicy(_model(role).grant("client", "c1", "r"))
    assert not p.can_publish(None, "c1", "a/secret")  # priority 5 first
    assert p.can_publish(None, "c1", "a/x")  # equal priority: position decides
    # across roles: the higher priority wins whatever the role name
    m = _model(_role("a", ("subscribePattern", "x/#", "allow", 0)),
               _role("b", ("subscribePattern", "x/#", "deny", 3)))
    p = RbacPolicy(m.grant("client", "c", "a").grant("client", "c", "b"))
    assert not p.can_subscribe(None, "c", "x/y")


def test_literal_pattern_and_shared_qualifiers() -> None:
    role = Role("r", (
        parse_rule("subscribeLiteral", "cmd/+", "allow"),
        parse_rule("subscribePattern", "data/#", "allow", shared="only"),
        parse_rule("subscribePattern", "q/#", "allow", qos=[0]),
    ))
    p = RbacPolicy(_model(role).grant("client", "c", "r"))
    assert p.can_subscribe(None, "c", "cmd/+")
    assert not p.can_subscribe(None, "c", "cmd/x")  # literal: only that exact filter
    assert p.can_subscribe(None, "c", "$share/g/data/#")
    assert not p.can_subscribe(None, "c", "data/#")  # shared only
    assert p.can_subscribe(None, "c", "q/a", qos=0)
    assert not p.can_subscribe(None, "c", "q/a", qos=1)
    assert not p.can_subscribe(None, "c", "q/a")  # qos unknown: a qualified allow is skipped
    assert p.can_receive(None, "c", "cmd/x")  # the literal filter as a filter for delivery
    # qualifiers were checked at SUBSCRIBE: a qualified allow holds at delivery, and a
    # qualified deny (of QoS 2 subscriptions) does not stop the QoS 0 one's messages
    assert p.can_receive(None, "c", "q/a") and p.can_receive(None, "c", "data/x")
    deny2 = Role("d", (parse_rule("subscribePattern", "q/#", "deny", priority=9, qos=[2]),))
    p = RbacPolicy(_model(role, deny2).grant("client", "c", "r").grant("client", "c", "d"))
    assert not p.can_subscribe(None, "c", "q/a", qos=2)
    assert p.can_subscribe(None, "c", "q/a", qos=0) and p.can_receive(None, "c", "q/a")


def test_publish_qos_and_retain_qualifiers() -> None:
    role = Role("r", (
        parse_rule("publishClientSend", "s/#", "deny", retain="true", priority=1),
        parse_rule("publishClientSend", "s/#", "allow", qos=[0, 1]),
    ))
    p = RbacPolicy(_model(role).grant("client", "c", "r"))
    assert p.can_publish(None, "c", "s/a", qos=1, retain=False)
    assert not p.can_publish(None, "c", "s/a", qos=1, retain=True)
    assert not p.can_publish(None, "c", "s/a", qos=2, retain=False)
    assert not p.can_publish(None, "c", "s/a")  # unknown flags: the deny applies (fail closed)


def test_placeholders_and_unsafe_values() -> None:
    role = _role("own", ("publishClientSend", "dev/${clientid}/#", "allow"),
                 ("subscribePattern", "u/${username}/#", "allow"),
                 ("subscribePattern", "t/${tenant}/#", "allow"))
    m = _model(role).add_group("all").grant("group", "all", "own")
    m = m.join("all", "client", "d1").join("all", "client", "a/b").join("all", "user", "bob")
    p = RbacPolicy(m, tenant_of=lambda u: u.split(":")[0] if u and ":" in u else None)
    assert p.can_publish(None, "d1", "dev/d1/x")
    assert not p.can_publish(None, "d1", "dev/d2/x")
    assert not p.can_publish(None, "a/b", "dev/a/b/x")  # a client id with / widens nothing
    assert p.can_subscribe("bob", "zz", "u/bob/#")
    assert not p.can_subscribe("bob", "zz", "t/#")
    m2 = m.join("all", "user", "acme:eve")
    p = RbacPolicy(m2, tenant_of=lambda u: u.split(":")[0] if u and ":" in u else None)
    assert p.can_subscribe("acme:eve", "e", "t/acme/#")
    assert not p.can_subscribe("acme:eve", "e", "t/other/#")


def test_anonymous_is_a_group() -> None:
    m = _model(_role("pub", ("publishClientSend", "open/#", "allow")))
    p = RbacPolicy(m.grant("group", "anonymous", "pub"))
    assert p.can_publish(None, "x", "open/1")
    assert not p.can_publish("alice", "x", "open/1")  # a named user is not anonymous


def test_acl_table_maps_to_config_acl() -> None:
    """The [[acl]] entries decide as before (first match, file order) and come first."""
    entries = [AclRule("*", "public/#", "all", "allow"),
               AclRule("alice", "private/%u/#", "all", "allow"),
               AclRule("*", "public/secret", "subscribe", "deny")]
    role = acl_role([(r.user, r.topic, r.action, r.access) for r in entries])
    p = RbacPolicy(RbacModel(), role)
    acl = Acl(entries, "deny")
    cases = [("alice", "c", "public/a"), ("alice", "c", "private/alice/x"),
             ("bob", "c", "private/alice/x"), (None, "c", "public/secret"), (None, "c", "x")]
    for user, cid, topic in cases:
        assert p.can_publish(user, cid, topic) == acl.can_publish(user, cid, topic), topic
        assert p.can_subscribe(user, cid, topic) == acl.can_subscribe(user, cid, topic), topic
        assert p.can_receive(user, cid, topic) == acl.can_receive(user, cid, topic), topic


def test_bad_input_is_refused() -> None:
    with pytest.raises(RbacError, match="unknown rule type"):
        parse_rule("publish", "a", "allow")
    with pytest.raises(RbacError, match="placeholder"):
        parse_rule("publishClientSend", "a/${nope}", "allow")
    with pytest.raises(RbacError, match="topic filter"):
        parse_rule("publishClientSend", "a/#/b", "allow")
    with pytest.raises(RbacError, match="qos"):
        parse_rule("publishClientSend", "a", "allow", qos=[3])
    m = RbacModel()
    with pytest.raises(RbacError, match="unknown role: ghost"):
        m.grant("user", "alice", "ghost")
    with pytest.raises(RbacError, match="unknown group: g"):
        m.join("g", "user", "alice")
    with pytest.raises(RbacError, match="built in"):
        m.delete_group("anonymous")


# --------------------------------------------------------------------------- the store


def test_store_round_trip_and_refused_edit(tmp_path: Path) -> None:
    store = RbacStore(tmp_path / "rbac.sqlite")
    role = Role("r", (parse_rule("publishClientSend", "a/${clientid}", "allow", 3, [1],
                                 "false", "any"),), "desc")
    store.edit(lambda m: m.put_role(role).add_group("g").grant("group", "g", "r")
               .join("g", "client", "c1"))
    gen, model = store.load()
    assert gen == 1 and model.roles["r"] == role
    assert model.roles_of(None, "c1") == ["r"]
    with pytest.raises(RbacError, match="unknown role"):
        store.edit(lambda m: m.grant("group", "g", "ghost"))
    assert store.load() == (1, model)  # nothing written, generation unchanged
    store.close()
    # durable: a new connection reads the same
    assert RbacStore(tmp_path / "rbac.sqlite").load() == (1, model)


def test_role_file(tmp_path: Path) -> None:
    text = """
[roles.w]
rules = [{ type = "publishClientSend", topic = "s/${clientid}/#", access = "allow", qos = [0, 1] }]
[groups.sensors]
roles = ["w"]
clients = ["d1"]
[users.bob]
roles = ["w"]
"""
    m = apply_role_file(RbacModel(), text)
    p = RbacPolicy(m)
    assert p.can_publish(None, "d1", "s/d1/t", 0, False)
    assert p.can_publish("bob", "x", "s/x/t", 1, False)
    with pytest.raises(RbacError, match="groups.g: unknown role: nope"):
        apply_role_file(m, '[groups.g]\nroles = ["nope"]\n')
    with pytest.raises(RbacError, match="not valid TOML"):
        apply_role_file(m, "[roles.x\n")
    with pytest.raises(RbacError, match=r"rules\[0\].type"):
        apply_role_file(m, '[roles.x]\nrules = [{ topic = "a", access = "allow" }]\n')


def test_live_reload_picks_up_edits(tmp_path: Path) -> None:
    path = tmp_path / "rbac.sqlite"
    now = [0.0]
    live = LiveRbac(path, None, interval=0.5, clock=lambda: now[0])
    assert not live.policy().can_publish(None, "c", "a")
    writer = RbacStore(path)
    writer.edit(lambda m: m.put_role(_role("r", ("publishClientSend", "a", "allow")))
                .grant("group", "anonymous", "r"))
    assert not live.policy().can_publish(None, "c", "a")  # not checked yet (interval)
    now[0] = 1.0
    assert live.policy().can_publish(None, "c", "a")
    assert live.generation == 1
    # a database that no longer validates keeps the running rules
    db = sqlite3.connect(path)
    db.execute("INSERT INTO grants VALUES ('user', 'x', 0, 'ghost')")
    db.execute("UPDATE meta SET value = 7")
    db.commit()
    now[0] = 2.0
    assert live.policy().can_publish(None, "c", "a") and live.generation == 1
    live.close()
    writer.close()


# --------------------------------------------------------------------------- config and CLI


def test_config_rbac_keys(tmp_path: Path) -> None:
    c = parse_config({"auth": {"rbac": True}}, tmp_path)
    assert c.auth.rbac and c.auth.acl_default == "deny"
    with pytest.raises(ConfigError, match="contradicts rbac"):
        parse_config({"auth": {"rbac": True, "acl_default": "allow"}}, tmp_path)
    assert parse_config({}, tmp_path).auth.acl_default == "allow"  # unchanged without rbac


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=30)


def test_cli_role_group_user(tmp_path: Path) -> None:
    db = str(tmp_path / "rbac.sqlite")
    assert _cli("role", "create", "w", "--db", db).returncode == 0
    r = _cli("role", "add-rule", "w", "publishClientSend", "s/${clientid}/#", "allow",
             "--qos", "0,1", "--priority", "4", "--db", db)
    assert r.returncode == 0, r.stderr
    assert _cli("group", "create", "g", "--db", db).returncode == 0
    assert _cli("group", "add-role", "g", "w", "--db", db).returncode == 0
    assert _cli("user", "add-group", "alice", "g", "--db", db).returncode == 0
    bad = _cli("user", "add-role", "alice", "ghost", "--db", db)
    assert bad.returncode == 1 and "unknown role: ghost; nothing changed" in bad.stderr
    bad = _cli("role", "add-rule", "w", "publishClientSend", "a/#/b", "allow", "--db", db)
    assert bad.returncode == 2 and "topic filter" in bad.stderr
    shown = _cli("role", "show", "w", "--db", db).stdout
    assert "allow publishClientSend s/${clientid}/# priority 4 qos 0,1" in shown
    roles = _cli("user", "roles", "alice", "--db", db).stdout
    assert "groups: g" in roles
    gen, model = RbacStore(Path(db)).load()
    assert gen == 5  # the two refused edits stored nothing
    assert RbacPolicy(model).can_publish("alice", "d9", "s/d9/x", 1, False)


def test_a_broken_database_is_refused_at_start_and_repairable(tmp_path: Path) -> None:
    path = tmp_path / "rbac.sqlite"
    RbacStore(path).close()
    db = sqlite3.connect(path)
    db.execute("INSERT INTO grants VALUES ('user', 'x', 0, 'ghost')")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="auth.rbac_db: .*unknown role: ghost"):
        LiveRbac(path, None)
    store = RbacStore(path)
    store.edit(lambda m: m.put_role(Role("ghost")))  # an edit may repair it
    store.close()
    live = LiveRbac(path, None)
    assert live.generation == 1
    live.close()


def test_indexed_decisions_equal_the_linear_acl() -> None:
    """Differential: random [[acl]] tables (wildcards at every position, placeholders) give
    the same answers through the RBAC index (first / second level buckets, caches) as
    through the linear first-match ACL."""
    import random

    rng = random.Random(18)
    levels = ["a", "b", "c", "+", "#", "%u", "%c"]

    def filt(n: int) -> str:
        out = []
        for i in range(n):
            lv = rng.choice(levels if i == n - 1 else levels[:4] + levels[5:])
            out.append(lv)
            if lv == "#":
                break
        return "/".join(out)

    for _round in range(40):
        entries = [AclRule(rng.choice(["*", "alice", "bob"]), filt(rng.randint(1, 4)),
                           rng.choice(["publish", "subscribe", "all"]),
                           rng.choice(["allow", "deny"])) for _ in range(rng.randint(1, 25))]
        acl = Acl(entries, "deny")
        p = RbacPolicy(RbacModel(), acl_role([(r.user, r.topic, r.action, r.access)
                                              for r in entries]))
        for _ in range(60):
            user = rng.choice([None, "alice", "bob"])
            cid = rng.choice(["c", "alice", "a"])
            topic = "/".join(rng.choice(["a", "b", "c", "alice", "bob"])
                             for _ in range(rng.randint(1, 4)))
            sub = "/".join(rng.choice(["a", "b", "+", "alice"]) for _ in range(rng.randint(1, 3)))
            assert p.can_publish(user, cid, topic) == acl.can_publish(user, cid, topic)
            assert p.can_receive(user, cid, topic) == acl.can_receive(user, cid, topic)
            assert p.can_subscribe(user, cid, sub) == acl.can_subscribe(user, cid, sub)
