"""Dependencies point one way (docs/architecture.md): every import of a ``rapidmq_edge``
module, read from the source with ``ast`` (lazy and ``TYPE_CHECKING`` imports included),
stays inside the set its package is allowed; the package graph has no cycle; the package
root holds no loose modules. A forbidden import fails here with the file and line."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rapidmq_edge"

#: package -> the project packages its modules may import (besides itself and the root
#: ``rapidmq_edge/__init__.py``, which only holds the version). Bottom to top.
ALLOWED: dict[str, frozenset[str]] = {
    # what every layer reports through (rate-limited logs): imports nothing, used by all
    "telemetry": frozenset(),
    # the protocols and the primitives: pure, no project imports
    "mqtt": frozenset(),
    "coap": frozenset(),
    "crypto": frozenset(),
    "store": frozenset(),  # rows and opaque bytes: knows no protocol
    "config": frozenset({"mqtt"}),  # topic-filter validation
    "security": frozenset({"config", "mqtt"}),
    "intelligence": frozenset({"config", "mqtt"}),  # models and detectors, no message path
    "broker": frozenset({"mqtt", "store"}),
    "uplink": frozenset({"mqtt"}),  # drains any UplinkSource (the queue satisfies it)
    "cloud": frozenset({"crypto", "mqtt"}),
    "pipeline": frozenset({"broker", "config", "crypto", "intelligence", "mqtt", "store"}),
    "ingress": frozenset({"broker", "coap", "config", "mqtt", "security"}),
    "ops": frozenset({"broker", "config", "intelligence", "pipeline", "store", "uplink"}),
    # model updates: manifests (crypto), the cluster link (uplink), slots and shadow scoring
    "ota": frozenset({"config", "crypto", "intelligence", "mqtt", "pipeline", "uplink"}),
    # the one assembly place, and the command line on top of everything
    "gateway": frozenset({"broker", "config", "crypto", "ingress", "intelligence", "mqtt",
                          "ops", "ota", "pipeline", "security", "store", "uplink"}),
    "cli": frozenset({"cloud", "config", "crypto", "gateway", "ops", "ota", "security"}),
}
#: packages every package may import
ANYONE = frozenset({"telemetry"})
#: the only modules directly in the package root
ROOT_MODULES = {"__init__.py", "__main__.py"}


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every ``rapidmq_edge`` import in ``path``."""
    package = list(path.relative_to(root.parent).parts[:-1])  # a module's or __init__'s
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            out += [(node.lineno, n) for n in names if n.startswith("rapidmq_edge")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names
                    if a.name.startswith("rapidmq_edge")]
    return out


def _package_of(module: str, root: Path) -> str | None:
    """The top-level package of ``rapidmq_edge.<package>...`` (None for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (root / parts[1]).is_dir() else None


def _edges(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> where ("file:line")."""
    edges: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            continue
        pkg = rel.parts[0]
        for line, module in _imports(path, root):
            target = _package_of(module, root)
            if target is not None and target != pkg:
                edges.setdefault(pkg, {}).setdefault(target, []).append(f"{rel}:{line}")
    return edges


@cache
def _tree_edges() -> dict[str, dict[str, list[str]]]:
    return _edges(ROOT)


def test_every_package_has_a_rule() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_stay_inside_the_allowed_set(package: str) -> None:
    found = _tree_edges().get(package, {})
    forbidden = {t: where for t, where in found.items()
                 if t not in ALLOWED[package] | ANYONE}
    assert not forbidden, f"{package}/ imports what it may not: {forbidden}"


def test_dependencies_point_one_way() -> None:
    """No cycle between packages, even among allowed edges."""
    edges = {p: set(t) for p, t in _tree_edges().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_the_root_holds_no_loose_modules() -> None:
    loose = {p.name for p in ROOT.glob("*.py")} - ROOT_MODULES
    assert not loose, f"modules directly in rapidmq_edge/: {sorted(loose)}"


def test_the_checker_sees_relative_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    """The test itself: a forbidden import in each form is found (a checker that sees
    nothing passes every tree)."""
    root = tmp_path / "rapidmq_edge"
    for pkg in ("store", "mqtt", "broker", "uplink", "crypto"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "store" / "queue.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..mqtt import codec\n"
        "if TYPE_CHECKING:\n    from ..broker.message import Message\n"
        "def f():\n    import rapidmq_edge.uplink.client\n"
    )
    (root / "store" / "__init__.py").write_text("from .. import crypto\n")
    edges = _edges(root)
    assert set(edges["store"]) == {"mqtt", "broker", "uplink", "crypto"}
    assert edges["store"]["mqtt"] == ["store/queue.py:2"]
