"""Roles, groups and grants in SQLite (``rbac.sqlite`` in the data directory).

Every edit is one ``BEGIN IMMEDIATE`` transaction: read the model, apply the edit (which
validates: an unknown role or group raises :class:`~.rbac.RbacError`), write it back and
bump ``generation``. A refused edit rolls back, so the stored (and running) rules stay as
they were. A running gateway polls ``generation`` and reloads when it changes.

A role file (``rapidmq-edge role import FILE``) is TOML::

    [roles.sensor-writer]
    description = "devices publish their own readings"
    rules = [
      { type = "publishClientSend", topic = "sensors/${clientid}/#", access = "allow",
        priority = 10, qos = [0, 1], retain = "false" },
    ]

    [groups.sensors]
    roles = ["sensor-writer"]
    users = ["alice"]
    clients = ["dev-1"]

    [users.bob]          # also [clients.<id>]
    roles = ["reader"]
"""

from __future__ import annotations

import sqlite3
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from .rbac import ANONYMOUS, RbacError, RbacModel, Role, Rule, parse_rule

__all__ = ["RbacStore", "apply_role_file"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS roles (name TEXT PRIMARY KEY, description TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rules (
    role TEXT NOT NULL REFERENCES roles(name), seq INTEGER NOT NULL, type TEXT NOT NULL,
    topic TEXT NOT NULL, allow INTEGER NOT NULL, priority INTEGER NOT NULL,
    qos TEXT NOT NULL, retain TEXT NOT NULL, shared TEXT NOT NULL,
    PRIMARY KEY (role, seq));
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS members (grp TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (grp, kind, name));
CREATE TABLE IF NOT EXISTS grants (kind TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL,
    role TEXT NOT NULL, PRIMARY KEY (kind, name, role));
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
INSERT OR IGNORE INTO groups VALUES ('anonymous');
"""


class RbacStore:
    """One connection to the RBAC database (created on first use)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        if not readonly:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    def generation(self) -> int:
        """The number of committed edits (changes whenever the rules do)."""
        row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0

    def load(self) -> tuple[int, RbacModel]:
        """(generation, model), read in one transaction."""
        with self._read():
            return self.generation(), self._model()

    @contextmanager
    def _read(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def _model(self, check: bool = True) -> RbacModel:
        db = self._db
        rules: dict[str, list[Rule]] = {}
        for role, type_, topic, allow, prio, qos, retain, shared in db.execute(
                "SELECT role, type, topic, allow, priority, qos, retain, shared FROM rules "
                "ORDER BY role, seq"):
            rules.setdefault(role, []).append(
                Rule(type_, topic, bool(allow), prio, frozenset(int(q) for q in qos.split(",")),
                     retain, shared))
        roles = {name: Role(name, tuple(rules.get(name, ())), desc)
                 for name, desc in db.execute("SELECT name, description FROM roles")}
        groups = frozenset(r[0] for r in db.execute("SELECT name FROM groups")) | {ANONYMOUS}
        members: dict[str, set[tuple[str, str]]] = {}
        for grp, kind, name in db.execute("SELECT grp, kind, name FROM members"):
            members.setdefault(grp, set()).add((kind, name))
        grants: dict[tuple[str, str], list[str]] = {}
        for kind, name, role in db.execute("SELECT kind, name, role FROM grants "
                                           "ORDER BY kind, name, seq"):
            grants.setdefault((kind, name), []).append(role)
        model = RbacModel(roles, groups, {g: frozenset(m) for g, m in members.items()},
                          {s: tuple(r) for s, r in grants.items()})
        return model.validate() if check else model

    def _write(self, model: RbacModel) -> None:
        db = self._db
        for table in ("rules", "roles", "groups", "members", "grants"):
            db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        db.executemany("INSERT INTO roles VALUES (?, ?)",
                       [(r.name, r.description) for r in model.roles.values()])
        db.executemany(
            "INSERT INTO rules VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(r.name, i, u.type, u.topic, int(u.allow), u.priority,
              ",".join(str(q) for q in sorted(u.qos)), u.retain, u.shared)
             for r in model.roles.values() for i, u in enumerate(r.rules)])
        db.executemany("INSERT INTO groups VALUES (?)", [(g,) for g in model.groups])
        db.executemany("INSERT INTO members VALUES (?, ?, ?)",
                       [(g, k, n) for g, ms in model.members.items() for k, n in ms])
        db.executemany("INSERT INTO grants VALUES (?, ?, ?, ?)",
                       [(k, n, i, r) for (k, n), rs in model.grants.items()
                        for i, r in enumerate(rs)])
        db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")

    def edit(self, change: Callable[[RbacModel], RbacModel]) -> RbacModel:
        """Apply ``change`` atomically; RbacError (or anything raised) leaves it unchanged."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # the stored model is not checked first, so an edit can repair a broken one
            model = change(self._model(check=False)).validate()
            self._write(model)
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back (disk full)
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return model


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RbacError(f"{where}: must be a list of strings")
    return list(value)


def _rule(entry: object, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise RbacError(f"{where}: must be a table")
    extra = set(entry) - {"type", "topic", "access", "priority", "qos", "retain", "shared"}
    if extra:
        raise RbacError(f"{where}: unknown key {sorted(extra)[0]}")
    for key in ("type", "topic", "access"):
        if not isinstance(entry.get(key), str):
            raise RbacError(f"{where}.{key}: required (a string)")
    qos = entry.get("qos")
    if qos is not None and not (isinstance(qos, list) and all(isinstance(q, int) for q in qos)):
        raise RbacError(f"{where}.qos: must be a list of QoS levels")
    try:
        return parse_rule(entry["type"], entry["topic"], entry["access"],
                          entry.get("priority", 0), qos, entry.get("retain", "any"),
                          entry.get("shared", "any"))
    except RbacError as exc:
        raise RbacError(f"{where}: {exc}") from None


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise RbacError(f"{key}: must be tables ([{key}.<name>])")
    return value


def _at(where: str, edit: Callable[[RbacModel], RbacModel], model: RbacModel) -> RbacModel:
    try:
        return edit(model)
    except RbacError as exc:
        raise RbacError(f"{where}: {exc}") from None


def _group(model: RbacModel, name: str, entry: dict[str, Any]) -> RbacModel:
    model = model.add_group(name)
    for r in _strings(entry.get("roles", []), "roles"):
        model = model.grant("group", name, r)
    for kind in ("user", "client"):
        for m in _strings(entry.get(kind + "s", []), kind + "s"):
            model = model.join(name, kind, m)
    return model


def _subject(model: RbacModel, kind: str, name: str, entry: dict[str, Any]) -> RbacModel:
    for r in _strings(entry.get("roles", []), "roles"):
        model = model.grant(kind, name, r)
    for g in _strings(entry.get("groups", []), "groups"):
        model = model.join(g, kind, name)
    return model


def apply_role_file(model: RbacModel, text: str, source: str = "role file") -> RbacModel:
    """``model`` with the roles, groups and grants of a role file merged in (checked whole)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RbacError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"roles", "groups", "users", "clients"}
    if unknown:
        raise RbacError(f"{source}: unknown table [{sorted(unknown)[0]}]")
    try:
        for name, entry in _table(doc, "roles").items():
            rules = entry.get("rules", [])
            if not isinstance(rules, list):
                raise RbacError(f"roles.{name}.rules: must be a list of tables")
            desc = entry.get("description", "")
            model = model.put_role(Role(name, tuple(
                _rule(r, f"roles.{name}.rules[{i}]") for i, r in enumerate(rules)),
                desc if isinstance(desc, str) else ""))
        for name, entry in _table(doc, "groups").items():
            model = _at(f"groups.{name}", partial(_group, name=name, entry=entry), model)
        for kind in ("user", "client"):
            for name, entry in _table(doc, kind + "s").items():
                model = _at(f"{kind}s.{name}",
                            partial(_subject, kind=kind, name=name, entry=entry), model)
    except RbacError as exc:
        raise RbacError(f"{source}: {exc}") from None
    return model.validate()
