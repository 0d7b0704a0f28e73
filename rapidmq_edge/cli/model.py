"""``rapidmq-edge model list | rollback``: the gateway's models and their OTA slots
(``collect | train``, the feedback loop's operator side: :mod:`.model_train`).

``list`` shows per component what scores: the shipped model (``models_dir``) or an OTA slot,
its version and manifest sequence, the OTA state (shadow, active, rejected, rolled-back with
the reason) and what a rollback would go back to.

``rollback COMPONENT`` makes the previous slot (or the shipped model) active in the slots on
disk, durably. A stopped gateway uses it at its next start; a running one follows the slots
every few seconds (``ota.activate.ActiveModels.run``) and swaps to it between two batches.
The accepted manifest sequence is not lowered: an older manifest stays refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config
from ..gateway.updates import RUNTIME_COMPONENTS
from ..ota.slots import SlotError, SlotStore
from .common import fail
from .model_train import register_train, run_train

__all__ = ["handles", "register", "run"]

#: the models in the message path, listed even without any slot
COMPONENTS = ("priority", "anomaly", "threat")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``model`` with ``list`` and ``rollback``."""
    model = sub.add_parser("model", help="the gateway's models: list, rollback (OTA slots); "
                           "collect, train (the feedback loop)")
    cmds = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    lst = cmds.add_parser("list", help="each model: source, slot, version, state")
    lst.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: "
                     "built-in)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    back = cmds.add_parser("rollback", help="go back to the previous slot or the shipped model")
    back.add_argument("component", metavar="COMPONENT", help="e.g. priority, threat")
    back.add_argument("--config", type=Path, metavar="FILE", help="TOML config (default: "
                      "built-in)")
    back.add_argument("--reason", default="operator: rapidmq-edge model rollback",
                      help="recorded as the rollback's reason")
    register_train(cmds)


def handles(command: str) -> bool:
    """True for the commands this module runs."""
    return command == "model"


def run(args: argparse.Namespace) -> int:
    """Execute ``model list``, ``rollback``, ``collect`` or ``train``."""
    if args.model_command in ("collect", "train"):
        return run_train(args)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))
    data_dir = config.gateway.data_dir
    models_dir = config.intelligence.models_dir
    slots = SlotStore(data_dir)
    if args.model_command == "list":
        try:
            rows = model_rows(slots, models_dir)
        except SlotError as exc:
            return fail(str(exc), 1)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(render(rows))
        return 0
    return _rollback(slots, data_dir, args.component, args.reason)


def _shipped_version(models_dir: Path, component: str) -> str:
    try:
        doc = json.loads((models_dir / f"{component}.json").read_text())
        return f"{doc.get('version', '?')}+{str(doc.get('sha256', ''))[:12]}"
    except (OSError, ValueError, AttributeError):
        return "? (no manifest)"


def model_rows(slots: SlotStore, models_dir: Path) -> list[dict[str, Any]]:
    """One row per component: what ``model list`` prints."""
    out = []
    for component in sorted({*COMPONENTS, *slots.components()}):
        st = slots.state(component)
        row: dict[str, Any] = {"component": component, "source": "shipped", "slot": None,
                               "version": _shipped_version(models_dir, component),
                               "sequence": None, "state": st.state, "reason": st.reason,
                               "previous": None, "candidate": None}
        if st.active is not None:
            info = slots.info(component, st.active)
            row.update(source="ota", slot=st.active, sequence=info.sequence,
                       version=f"{info.version}+{info.digest[:12]}",
                       healthy=st.healthy)
            if st.previous is not None:
                prev = slots.info(component, st.previous)
                row["previous"] = f"slot {st.previous} {prev.version} (sequence {prev.sequence})"
            else:
                row["previous"] = "shipped"
        if component not in RUNTIME_COMPONENTS and st.active is None and not st.reason:
            row["reason"] = "ships with the gateway (a running one does not swap it over the air)"
        if st.candidate is not None:
            with_info = slots.info(component, st.candidate)
            row["candidate"] = (f"slot {st.candidate} {with_info.version} "
                                f"(sequence {with_info.sequence})")
        out.append(row)
    return out


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned table (reasons on their own line)."""
    head = ("COMPONENT", "SOURCE", "SLOT", "VERSION", "SEQ", "STATE", "PREVIOUS", "CANDIDATE")
    table = [head]
    for r in rows:
        table.append((r["component"], r["source"], r["slot"] or "-", r["version"],
                      "-" if r["sequence"] is None else str(r["sequence"]),
                      r["state"] + ("" if r.get("healthy", True) else " (probation)"),
                      r["previous"] or "-", r["candidate"] or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    lines += [f"{r['component']}: {r['state']}: {r['reason']}" for r in rows if r["reason"]]
    return "\n".join(lines)


def _rollback(slots: SlotStore, data_dir: Path, component: str, reason: str) -> int:
    from ..ops.status import lock_holder
    from ..ota.activate import FOLLOW_S  # numpy (the scorers): not for the other commands

    try:
        before = slots.state(component)
        back = slots.rollback(component, reason)
    except SlotError as exc:
        return fail(str(exc), 1)
    target = (f"slot {back} ({slots.info(component, back).version})" if back
              else "the shipped model")
    print(f"{component}: rolled back from slot {before.active} to {target}")
    pid = lock_holder(data_dir)
    if pid is not None:
        print(f"the running gateway (pid {pid}) switches to it within {FOLLOW_S:g} s, "
              "between two batches", file=sys.stderr)
    else:
        print("the gateway is not running: it uses it at its next start", file=sys.stderr)
    return 0
