"""Tests for rapidmq_edge.security.users and rapidmq_edge.security.acl."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from rapidmq_edge.config import AclRule, ConfigError, parse_config
from rapidmq_edge.security.acl import Acl
from rapidmq_edge.security.users import (
    UserDB,
    UsersFileError,
    add_user,
    hash_password,
    remove_user,
    verify_password,
)

# --------------------------------------------------------------------------- passwords


def test_hash_format_and_verify() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("$scrypt$ln=14,r=8,p=1$")
    assert len(encoded.split("$")) == 5
    assert verify_password("s3cret", encoded)
    assert verify_password(b"s3cret", encoded)
    assert not verify_password("S3cret", encoded)
    assert hash_password("s3cret") != encoded  # fresh salt


@pytest.mark.parametrize(
    "encoded",
    [
        "",
        "plain",
        "$2b$12$abcdefghijklmnopqrstuv",
        "$scrypt$ln=14,r=8$AAAA$AAAA",
        "$scrypt$ln=14,r=8,p=1$!!!$AAAA",
        "$scrypt$ln=40,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "$scrypt$ln=14,r=8,p=1,x=2$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_unknown_formats_do_not_verify(encoded: str) -> None:
    assert verify_password("pw", encoded) is False


# --------------------------------------------------------------------------- users file


def test_users_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "users.toml"
    assert add_user(path, "alice", "wonderland") is True
    assert add_user(path, "bob", "builder") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = UserDB.load(path)
    assert db.names() == ["alice", "bob"]
    assert db.authenticate("alice", b"wonderland")
    assert not db.authenticate("alice", b"builder")
    assert not db.authenticate("alice", None)
    assert not db.authenticate("carol", b"wonderland")

    assert add_user(path, "alice", "looking-glass") is False  # password change
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = UserDB.load(path)
    assert not db.authenticate("alice", b"wonderland")
    assert db.authenticate("alice", b"looking-glass")

    assert remove_user(path, "bob") is True
    assert remove_user(path, "bob") is False
    assert UserDB.load(path).names() == ["alice"]
    assert [p.name for p in path.parent.iterdir()] == ["users.toml"]  # no temp files left


def test_add_user_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty password"):
        add_user(tmp_path / "u.toml", "alice", "")
    with pytest.raises(ValueError, match="invalid user name"):
        add_user(tmp_path / "u.toml", "", "pw")
    with pytest.raises(ValueError, match="invalid user name"):
        add_user(tmp_path / "u.toml", "a\nb", "pw")
    assert not (tmp_path / "u.toml").exists()


def test_unicode_and_dotted_names(tmp_path: Path) -> None:
    path = tmp_path / "u.toml"
    add_user(path, "dev.01 ñ", "pässword")
    db = UserDB.load(path)
    assert db.names() == ["dev.01 ñ"]
    assert db.authenticate("dev.01 ñ", "pässword".encode())


def test_successful_logins_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rapidmq_edge.security.users as users

    db = UserDB({"alice": hash_password("pw")})
    calls: list[str] = []
    real = users._verify

    def counting(pw: bytes, encoded: str) -> bool:
        calls.append(encoded)
        return real(pw, encoded)

    monkeypatch.setattr(users, "_verify", counting)
    assert db.authenticate("alice", b"pw")
    assert db.authenticate("alice", b"pw")
    assert asyncio.run(db.authenticate_async("alice", b"pw"))
    assert len(calls) == 1
    assert not db.authenticate("alice", b"wrong")
    assert not db.authenticate("alice", b"wrong")
    assert len(calls) == 3  # failures are never cached
    assert not db.authenticate("nobody", b"pw")  # still costs one hash
    assert len(calls) == 4
    # the cache key separates username and password
    assert not db.authenticate("alic", b"epw")


def test_authenticate_async_runs_miss_in_thread() -> None:
    db = UserDB({"alice": hash_password("pw")})
    assert asyncio.run(db.authenticate_async("alice", b"pw"))
    assert not asyncio.run(db.authenticate_async("alice", b"nope"))
    assert not asyncio.run(db.authenticate_async("alice", None))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[users.alice\n", "invalid TOML"),
        ('[users.alice]\npassword = "hunter2"\n', "users.alice.password: must be"),
        ("[users.alice]\npassword = 5\n", "users.alice.password: must be"),
        ("[users.alice]\n", "users.alice.password: must be"),
        ('[users]\nalice = "x"\n', "users.alice: must be a table"),
        ('users = "x"\n', "users: must be a table"),
        ('[people.alice]\npassword = "x"\n', "people: unknown key"),
        ('[users.alice]\npasswd = "x"\n', "users.alice.passwd: unknown key"),
    ],
)
def test_corrupt_users_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UsersFileError) as info:
        UserDB.load(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_missing_users_file(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="users file not found"):
        UserDB.load(tmp_path / "none.toml")
    with pytest.raises(UsersFileError):
        remove_user(tmp_path / "none.toml", "alice")


def test_empty_users_file(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("")
    assert UserDB.load(path).names() == []


# --------------------------------------------------------------------------- ACL


def rule(user: str, topic: str, access: str, action: str = "all") -> AclRule:
    return AclRule(user, topic, action, access)  # type: ignore[arg-type]


def test_default_applies_without_rules() -> None:
    assert Acl([], "allow").can_publish(None, "c", "a/b")
    assert not Acl([], "deny").can_publish(None, "c", "a/b")
    assert not Acl([], "deny").can_subscribe("u", "c", "#")
    with pytest.raises(ValueError):
        Acl([], "maybe")


def test_first_match_wins() -> None:
    acl = Acl(
        [
            rule("*", "sensors/secret", "deny"),
            rule("*", "sensors/#", "allow"),
            rule("*", "sensors/other", "deny"),
        ],
        "deny",
    )
    assert not acl.can_publish("u", "c", "sensors/secret")
    assert acl.can_publish("u", "c", "sensors/other")
    assert acl.can_publish("u", "c", "sensors")  # "#" also matches the parent level
    assert not acl.can_publish("u", "c", "actuators/x")


def test_actions() -> None:
    acl = Acl(
        [
            rule("*", "ro/#", "allow", "subscribe"),
            rule("*", "wo/#", "allow", "publish"),
        ],
        "deny",
    )
    assert acl.can_subscribe("u", "c", "ro/x") and not acl.can_publish("u", "c", "ro/x")
    assert acl.can_publish("u", "c", "wo/x") and not acl.can_subscribe("u", "c", "wo/x")


def test_user_matching_and_anonymous() -> None:
    acl = Acl(
        [
            rule("admin", "#", "allow"),
            rule("*", "public/#", "allow"),
        ],
        "deny",
    )
    assert acl.can_publish("admin", "c", "anything/at/all")
    assert not acl.can_publish("administrator", "c", "anything")
    assert acl.can_publish(None, "c", "public/x")  # "*" includes anonymous
    assert acl.can_publish("bob", "c", "public/x")
    assert not acl.can_publish(None, "c", "private/x")


def test_placeholders() -> None:
    acl = Acl(
        [
            rule("*", "users/%u/#", "allow"),
            rule("*", "devices/%c/+", "allow", "publish"),
            rule("*", "mixed/%u-%c", "allow"),
        ],
        "deny",
    )
    assert acl.can_publish("alice", "dev1", "users/alice/inbox")
    assert not acl.can_publish("alice", "dev1", "users/bob/inbox")
    assert not acl.can_publish(None, "dev1", "users/%u/inbox")  # %u never matches anonymous
    assert not acl.can_publish(None, "dev1", "users//inbox")
    assert acl.can_publish(None, "dev1", "devices/dev1/temp")
    assert not acl.can_publish(None, "dev2", "devices/dev1/temp")
    assert acl.can_publish("alice", "dev1", "mixed/alice-dev1")
    assert acl.can_subscribe("alice", "dev1", "users/alice/#")
    assert not acl.can_subscribe("alice", "dev1", "users/+/#")


def test_placeholders_cannot_inject_wildcards_or_levels() -> None:
    acl = Acl([rule("*", "users/%u/#", "allow"), rule("*", "d/%c", "allow")], "deny")
    assert not acl.can_publish("#", "c", "users/bob/x")
    assert not acl.can_publish("+", "c", "users/bob/x")
    assert not acl.can_subscribe("+", "c", "users/+/#")
    assert not acl.can_subscribe("#", "c", "users/#")
    assert not acl.can_publish("a/b", "c", "users/a/b/x")
    assert not acl.can_publish("u", "x/y", "d/x/y")
    assert not acl.can_publish("", "c", "users//x")
    # deny rules still apply literally, so they stay conservative
    deny = Acl([rule("*", "users/%u/#", "deny")], "allow")
    assert not deny.can_subscribe("+", "c", "users/+/#")
    assert deny.can_subscribe("+", "c", "users/bob/#")


def test_subscribe_filter_compared_literally() -> None:
    acl = Acl(
        [
            rule("*", "test/nosubscribe", "deny", "subscribe"),
            rule("*", "sensors/a", "allow"),
            rule("*", "open/#", "allow"),
        ],
        "allow",
    )
    assert not acl.can_subscribe("u", "c", "test/nosubscribe")
    assert acl.can_publish("u", "c", "test/nosubscribe")
    assert acl.can_subscribe("u", "c", "test/other")
    strict = Acl([rule("*", "sensors/a", "allow"), rule("*", "open/#", "allow")], "deny")
    assert strict.can_subscribe("u", "c", "sensors/a")
    assert not strict.can_subscribe("u", "c", "sensors/+")  # wider than the rule
    assert strict.can_subscribe("u", "c", "open/+/temp")
    assert strict.can_subscribe("u", "c", "open/#")


def test_shared_subscriptions_are_stripped() -> None:
    acl = Acl([rule("*", "test/nosubscribe", "deny", "subscribe")], "allow")
    assert not acl.can_subscribe("u", "c", "$share/g/test/nosubscribe")
    assert acl.can_subscribe("u", "c", "$share/g/test/ok")
    assert not acl.can_subscribe("u", "c", "$share/g")  # malformed -> denied
    deny = Acl([rule("*", "x/#", "allow")], "deny")
    assert deny.can_subscribe("u", "c", "$share/grp/x/y")
    assert not deny.can_subscribe("u", "c", "$share/grp/y")


def test_hash_rule_covers_sys() -> None:
    acl = Acl([rule("admin", "#", "allow"), rule("*", "+/status", "allow")], "deny")
    assert acl.can_subscribe("admin", "c", "$SYS/#")
    assert acl.can_subscribe("admin", "c", "$SYS/broker/uptime")
    assert acl.can_publish("admin", "c", "$SYS/broker/uptime")
    assert acl.can_publish("bob", "c", "$SYS/status")
    assert not acl.can_subscribe("bob", "c", "$SYS/#")
    blocker = Acl([rule("*", "#", "deny", "subscribe")], "allow")
    assert not blocker.can_subscribe("u", "c", "$SYS/broker/clients")


def test_cache_is_per_client() -> None:
    acl = Acl([rule("*", "d/%c/#", "allow")], "deny")
    for i in range(50):
        assert acl.can_publish(None, f"c{i}", f"d/c{i}/x")
        assert not acl.can_publish(None, f"c{i}", f"d/c{i + 1}/x")
    acl.forget(None, "c1")
    assert acl.can_publish(None, "c1", "d/c1/x")


def test_acl_from_config(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "auth": {"acl_default": "deny"},
            "acl": [{"user": "*", "topic": "a/%c", "access": "allow", "action": "publish"}],
        },
        tmp_path,
    )
    acl = Acl.from_config(cfg)
    assert acl.can_publish("u", "x", "a/x")
    assert not acl.can_publish("u", "x", "a/y")
    assert not acl.can_subscribe("u", "x", "a/x")
