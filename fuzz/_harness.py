"""What every harness shares: instrumentation when it runs under atheris, the libFuzzer
entry point with a per-input time limit, and the corpus layout.

A harness module is importable without atheris (the corpus replay test imports it): atheris
is imported only when the module runs as a program (``python -m fuzz.<target>``).

Known bugs that cannot be fixed yet live in ``fuzz/pending/``: their inputs (never replayed
by the tests) and ``known.txt``, one signature per line (``ExceptionType
rapidmq_edge/path.py:function``, the innermost project frame). With ``FUZZ_SKIP_PENDING=1``
a fuzzer treats an exception with such a signature as expected, so that a long run can go
on looking for other bugs; without it, every failure stops the fuzzer.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CORPUS", "PENDING", "TIMEOUT", "corpus_files", "fuzz_main", "instrumented",
    "known_pending", "signature",
]

#: the committed seed corpora, one folder per target
CORPUS = Path(__file__).resolve().parent / "corpus"
#: inputs of known, not yet fixed bugs (not replayed) and their signatures (known.txt)
PENDING = Path(__file__).resolve().parent / "pending"
#: default per-input time limit (seconds, libFuzzer ``-timeout=``)
TIMEOUT = 10


def instrumented(active: bool) -> contextlib.AbstractContextManager[Any]:
    """Around a harness's project imports: with ``active`` (the module runs under atheris),
    instrument every ``rapidmq_edge`` module imported inside the block for coverage."""
    if not active:
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["rapidmq_edge"])


def corpus_files(target: str) -> Iterator[Path]:
    """The seed files of ``target`` (sorted, hidden files skipped)."""
    folder = CORPUS / target
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            yield path


def signature(exc: BaseException) -> str:
    """``ExceptionType rapidmq_edge/path.py:function`` of the innermost project frame."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "/rapidmq_edge/" in path:
            where = "rapidmq_edge/" + path.rsplit("/rapidmq_edge/", 1)[1] + ":" + frame.name
    return f"{type(exc).__name__} {where}"


def known_pending() -> set[str]:
    """The signatures listed in ``fuzz/pending/known.txt`` (``#`` starts a comment)."""
    path = PENDING / "known.txt"
    if not path.is_file():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {line for line in lines if line}


def fuzz_main(check: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Run ``check`` under libFuzzer (atheris); ``-timeout=`` defaults to :data:`TIMEOUT`.

    With ``FUZZ_SKIP_PENDING=1`` in the environment, exceptions whose :func:`signature` is
    listed in ``fuzz/pending/known.txt`` do not stop the fuzzer.
    """
    import atheris

    args = list(sys.argv if argv is None else argv)
    if not any(a.startswith("-timeout=") for a in args[1:]):
        args.insert(1, f"-timeout={TIMEOUT}")
    target = check
    if os.environ.get("FUZZ_SKIP_PENDING") == "1":
        known = known_pending()

        def target(data: bytes) -> None:
            try:
                check(data)
            except Exception as exc:
                if signature(exc) not in known:
                    raise

    atheris.Setup(args, target)
    atheris.Fuzz()
