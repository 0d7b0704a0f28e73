"""``rapidmq-edge model collect | train``: the operator's side of the feedback loop.

``collect --url mqtt://cluster --out DIR`` keeps every gateway's uploaded feedback (sampled
scored rows, incident verdicts) in DIR until ``--duration`` seconds passed or ``--rows``
rows came. ``train --from DIR | --url URL --component priority --out FILE.onnx`` retrains
the component from that data (``--url``: collects first, for ``--duration`` / ``--rows``)
and writes a model in the component's contract plus ``FILE.json`` (version, data,
quality), ready for ``rapidmq-edge ota sign --model FILE.onnx``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from .common import fail

__all__ = ["register_train", "run_train"]


def _cluster(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--url", action="append", required=required, metavar="URL",
                   help="mqtt://host:port of the cluster (repeat for more nodes)")
    p.add_argument("--prefix", default="rapidmq/ota")
    p.add_argument("--username")
    p.add_argument("--password-file", type=Path, metavar="FILE")
    p.add_argument("--mqtt-version", type=int, choices=(4, 5), default=5)
    p.add_argument("--duration", type=float, metavar="S",
                   help="collect this long (default: until --rows, else 60 s)")
    p.add_argument("--rows", type=int, metavar="N", help="stop collecting after N rows")
    p.add_argument("--verdicts", type=int, default=0, metavar="N",
                   help="with --rows: and at least N operator verdicts")


def register_train(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``collect`` and ``train`` under ``model``."""
    col = cmds.add_parser("collect", help="keep the gateways' uploaded feedback in a directory")
    _cluster(col, True)
    col.add_argument("--out", type=Path, required=True, metavar="DIR")
    tr = cmds.add_parser("train", help="retrain a model from collected feedback")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", type=Path, metavar="DIR",
                     help="a directory model collect filled")
    _cluster(tr, False)
    tr.add_argument("--component", default="priority", choices=("priority", "threat"))
    tr.add_argument("--out", type=Path, required=True, metavar="FILE.onnx")
    tr.add_argument("--model-version", required=True, metavar="V",
                    help="the new model's version (e.g. 1.1.0)")
    tr.add_argument("--hidden", type=int, default=32, help="hidden units (default 32)")
    tr.add_argument("--epochs", type=int, default=400)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--min-rows", type=int, default=50,
                    help="refuse to train on fewer rows (default 50)")


def _collect(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ..ota.feedback_collect import collect

    password = args.password_file.read_text().strip() if args.password_file else None
    duration = args.duration if args.duration is not None else (None if args.rows else 60.0)
    archive = asyncio.run(collect(args.url, out, prefix=args.prefix, duration=duration,
                                  min_rows=args.rows, min_verdicts=args.verdicts,
                                  username=args.username,
                                  password=password, version=args.mqtt_version))
    return archive.stats()


def run_train(args: argparse.Namespace) -> int:
    """Execute ``model collect`` or ``model train``."""
    if args.model_command == "collect":
        stats = _collect(args, args.out)
        print(json.dumps(stats))
        return 0 if stats["batches"] else 1
    from ..ota.feedback_collect import load_archive
    from ..ota.trainer import train

    with tempfile.TemporaryDirectory(prefix="rmqe-feedback-") as tmp:
        source = args.source
        if source is None:
            if not args.url:
                return fail("give --from DIR or --url URL")
            print(json.dumps({"collected": _collect(args, Path(tmp))}))
            source = Path(tmp)
        if not source.is_dir():
            return fail(f"{source}: no such directory")
        rows, verdicts = load_archive(source, args.component)
    if len(rows) < args.min_rows:
        return fail(f"only {len(rows)} {args.component} rows in {source} (--min-rows "
                    f"{args.min_rows})", 1)
    try:
        report = train(rows, verdicts, args.component, args.out, version=args.model_version,
                       hidden=args.hidden, epochs=args.epochs, seed=args.seed)
    except ImportError as exc:
        return fail(f"model train needs the [train] extra (onnx): {exc}")
    except ValueError as exc:
        return fail(str(exc), 1)
    print(json.dumps(report))
    return 0
