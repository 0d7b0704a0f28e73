"""``rapidmq-edge role | group`` (and ``user add-role | remove-role | add-group |
remove-group | roles``): the RBAC database, edited while a gateway runs (it reloads).

Each change is one transaction; a change that does not parse or names an unknown role or
group is refused (exit 2, or 1 for an unknown name) and nothing is stored.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError, load_config
from ..security.rbac import RULE_TYPES, RbacError, RbacModel, Role, parse_rule
from ..security.rbac_store import RbacStore, apply_role_file
from .common import fail

__all__ = ["USER_ACTIONS", "handles", "register", "register_user_actions", "run", "run_user"]

#: the ``user`` actions this module adds to the accounts' ``user`` command
USER_ACTIONS = ("add-role", "remove-role", "add-group", "remove-group", "roles")


def _source() -> argparse.ArgumentParser:
    source = argparse.ArgumentParser(add_help=False)
    where = source.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, metavar="FILE",
                       help="take auth.rbac_db (default: data_dir/rbac.sqlite) from it")
    where.add_argument("--db", type=Path, metavar="FILE", help="the RBAC database to edit")
    return source


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``role`` and ``group`` to the top-level subparsers."""
    src = _source()
    role = sub.add_parser("role", help="manage RBAC roles and their rules")
    rsub = role.add_subparsers(dest="role_command", required=True, metavar="ACTION")
    create = rsub.add_parser("create", parents=[src], help="create (or describe) a role")
    create.add_argument("name", metavar="ROLE")
    create.add_argument("--description", default="")
    rsub.add_parser("delete", parents=[src], help="delete a role and its grants").add_argument(
        "name", metavar="ROLE")
    rsub.add_parser("list", parents=[src], help="list roles")
    rsub.add_parser("show", parents=[src], help="a role's numbered rules").add_argument(
        "name", metavar="ROLE")
    rule = rsub.add_parser("add-rule", parents=[src], help="append a rule to a role")
    rule.add_argument("name", metavar="ROLE")
    rule.add_argument("type", metavar="TYPE", choices=RULE_TYPES,
                      help="one of " + ", ".join(RULE_TYPES))
    rule.add_argument("topic", metavar="TOPIC",
                      help="filter; may hold ${clientid} ${username} ${tenant} ${cert_cn}")
    rule.add_argument("access", metavar="ACCESS", choices=("allow", "deny"))
    rule.add_argument("--priority", type=int, default=0, help="higher is tried first")
    rule.add_argument("--qos", default=None, help="QoS levels it applies to, e.g. 0,1")
    rule.add_argument("--retain", default="any", choices=("any", "true", "false"))
    rule.add_argument("--shared", default="any", choices=("any", "only", "never"))
    unrule = rsub.add_parser("remove-rule", parents=[src], help="remove rule N (role show)")
    unrule.add_argument("name", metavar="ROLE")
    unrule.add_argument("index", metavar="N", type=int)
    imp = rsub.add_parser("import", parents=[src], help="merge a TOML role file (all or nothing)")
    imp.add_argument("file", metavar="FILE", type=Path)
    for verb in ("grant", "revoke"):
        g = rsub.add_parser(verb, parents=[src], help=f"{verb} a role to a user, client or group")
        g.add_argument("name", metavar="ROLE")
        who = g.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--client")
        who.add_argument("--group")

    group = sub.add_parser("group", help="manage RBAC groups")
    gsub = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    gsub.add_parser("create", parents=[src], help="create a group").add_argument(
        "name", metavar="GROUP")
    gsub.add_parser("delete", parents=[src], help="delete a group").add_argument(
        "name", metavar="GROUP")
    gsub.add_parser("list", parents=[src], help="list groups")
    gsub.add_parser("show", parents=[src], help="a group's members and roles").add_argument(
        "name", metavar="GROUP")
    for verb in ("add-role", "remove-role"):
        p = gsub.add_parser(verb, parents=[src], help=f"{verb.split('-')[0]} a group's role")
        p.add_argument("name", metavar="GROUP")
        p.add_argument("role", metavar="ROLE")
    for verb in ("add-member", "remove-member"):
        p = gsub.add_parser(verb, parents=[src], help=f"{verb.split('-')[0]} a user or client")
        p.add_argument("name", metavar="GROUP")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--user")
        who.add_argument("--client")


def register_user_actions(usub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the RBAC actions to ``rapidmq-edge user``."""
    src = _source()
    for verb, what in (("add-role", "ROLE"), ("remove-role", "ROLE"), ("add-group", "GROUP"),
                       ("remove-group", "GROUP")):
        p = usub.add_parser(verb, parents=[src], help=f"RBAC: {verb.replace('-', ' ')}")
        p.add_argument("name", metavar="NAME")
        p.add_argument("target", metavar=what)
    usub.add_parser("roles", parents=[src], help="RBAC: a user's groups and roles").add_argument(
        "name", metavar="NAME")


def handles(command: str) -> bool:
    """True for the commands this module runs."""
    return command in ("role", "group")


def _db(args: argparse.Namespace) -> Path:
    if args.db is not None:
        return Path(args.db)
    if args.config is None:
        raise ConfigError("no RBAC database: pass --config FILE or --db FILE")
    config = load_config(args.config)
    return config.auth.rbac_db or config.gateway.data_dir / "rbac.sqlite"


def _guard(action: Callable[[RbacStore], int], args: argparse.Namespace) -> int:
    try:
        store = RbacStore(_db(args))
    except ConfigError as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{exc.filename or 'RBAC database'}: {exc.strerror or exc}", 1)
    try:
        return action(store)
    except RbacError as exc:
        msg = str(exc)
        return fail(f"{msg}; nothing changed", 1 if "unknown role:" in msg
                    or "unknown group:" in msg else 2)
    except OSError as exc:
        return fail(f"{exc.filename or 'file'}: {exc.strerror or exc}", 1)
    finally:
        store.close()


def _change(store: RbacStore, edit: Callable[[RbacModel], RbacModel], done: str) -> int:
    store.edit(edit)
    print(f"{done} (generation {store.generation()})")
    return 0


def _who(args: argparse.Namespace) -> tuple[str, str]:
    for kind in ("user", "client", "group"):
        value = getattr(args, kind, None)
        if value is not None:
            return kind, value
    raise RbacError("name a --user, --client or --group")


def _role_action(args: argparse.Namespace, store: RbacStore) -> int:
    cmd, name = args.role_command, getattr(args, "name", "")
    if cmd == "list":
        for r in sorted(store.load()[1].roles.values(), key=lambda r: r.name):
            print(f"{r.name}\t{len(r.rules)} rules\t{r.description}")
        return 0
    if cmd == "show":
        role = store.load()[1].roles.get(name)
        if role is None:
            return fail(f"unknown role: {name}", 1)
        for i, rule in enumerate(role.rules):
            print(f"{i}\t{rule.describe()}")
        return 0
    if cmd == "create":
        return _change(store, lambda m: m.put_role(Role(
            name, m.roles[name].rules if name in m.roles else (), args.description)),
            f"role {name} stored")
    if cmd == "delete":
        return _change(store, lambda m: m.delete_role(name), f"role {name} deleted")
    if cmd == "add-rule":
        qos = None
        if args.qos is not None:
            try:
                qos = [int(q) for q in args.qos.split(",")]
            except ValueError:
                raise RbacError(f"--qos must be levels like 0,1, got {args.qos!r}") from None
        rule = parse_rule(args.type, args.topic, args.access, args.priority, qos, args.retain,
                          args.shared)
        return _change(store, lambda m: m.add_rule(name, rule),
                       f"role {name}: added {rule.describe()}")
    if cmd == "remove-rule":
        return _change(store, lambda m: m.remove_rule(name, args.index),
                       f"role {name}: removed rule {args.index}")
    if cmd == "import":
        text = Path(args.file).read_text()
        return _change(store, lambda m: apply_role_file(m, text, str(args.file)),
                       f"imported {args.file}")
    kind, who = _who(args)
    granted = cmd == "grant"
    return _change(store, lambda m: m.grant(kind, who, name, granted),
                   f"{'granted' if granted else 'revoked'} role {name} "
                   f"{'to' if granted else 'from'} {kind} {who}")


def _group_action(args: argparse.Namespace, store: RbacStore) -> int:
    cmd, name = args.group_command, getattr(args, "name", "")
    if cmd == "list":
        model = store.load()[1]
        for g in sorted(model.groups):
            print(f"{g}\t{len(model.members.get(g, ()))} members\t"
                  + ",".join(model.grants.get(("group", g), ())))
        return 0
    if cmd == "show":
        model = store.load()[1]
        if name not in model.groups:
            return fail(f"unknown group: {name}", 1)
        print("roles: " + ", ".join(model.grants.get(("group", name), ())))
        for kind, member in sorted(model.members.get(name, ())):
            print(f"{kind}\t{member}")
        return 0
    if cmd == "create":
        return _change(store, lambda m: m.add_group(name), f"group {name} stored")
    if cmd == "delete":
        return _change(store, lambda m: m.delete_group(name), f"group {name} deleted")
    if cmd in ("add-role", "remove-role"):
        add = cmd == "add-role"
        return _change(store, lambda m: m.grant("group", name, args.role, add),
                       f"group {name}: {'added' if add else 'removed'} role {args.role}")
    kind, who = _who(args)
    add = cmd == "add-member"
    return _change(store, lambda m: m.join(name, kind, who, add),
                   f"group {name}: {'added' if add else 'removed'} {kind} {who}")


def run(args: argparse.Namespace) -> int:
    """Execute ``role`` or ``group``."""
    if args.command == "role":
        return _guard(lambda store: _role_action(args, store), args)
    return _guard(lambda store: _group_action(args, store), args)


def run_user(args: argparse.Namespace) -> int:
    """Execute one of :data:`USER_ACTIONS` of ``rapidmq-edge user``."""
    def action(store: RbacStore) -> int:
        cmd, name = args.user_command, args.name
        if cmd == "roles":
            model = store.load()[1]
            print("groups: " + ", ".join(g for g in model.groups_of(name, "")
                                         if ("user", name) in model.members.get(g, ())))
            print("roles: " + ", ".join(model.grants.get(("user", name), ())))
            return 0
        on = cmd.startswith("add-")
        if cmd.endswith("-role"):
            return _change(store, lambda m: m.grant("user", name, args.target, on),
                           f"user {name}: {'added' if on else 'removed'} role {args.target}")
        return _change(store, lambda m: m.join(args.target, "user", name, on),
                       f"user {name}: {'joined' if on else 'left'} group {args.target}")
    return _guard(action, args)
