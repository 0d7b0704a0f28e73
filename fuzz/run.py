"""Run every fuzzer (one at a time) for N seconds from its committed corpus.

    python -m fuzz.run [--seconds N] [--timeout S] [TARGET ...]      (from the repository root)

``--seconds`` defaults to ``$FUZZ_SECONDS`` or 60; ``--skip-pending`` lets a fuzzer go on
past the known bugs listed in ``fuzz/pending/known.txt``. Each target fuzzes a scratch copy of
``fuzz/corpus/<target>/`` in a temporary folder (the committed corpus never grows by
itself); crashing inputs are written to ``fuzz/artifacts/<target>/`` (not committed). One
JSON line per target is printed: runs, execs/s, coverage and features at start and end,
corpus size, crashes. The exit status is 1 when any target crashed, timed out or ran out of
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fuzz._harness import CORPUS, TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
#: every harness, in the order they run
TARGETS = ("mqtt_codec", "mqtt_framing", "coap", "cose", "http_api", "config_files")

_STATUS = re.compile(
    r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/(\d+)(\w+))?.*?"
    r"(?:exec/s: (\d+))?(?: rss: (\d+)Mb)?"
)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)")
_ARTIFACT = re.compile(r"(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+$")


def _parse(log: str) -> dict[str, Any]:
    """Coverage, features and stats out of a libFuzzer log."""
    out: dict[str, Any] = {}
    for line in log.splitlines():
        m = _STATUS.match(line)
        if m:
            cov, ft = int(m.group(3)), int(m.group(4))
            if m.group(2) == "INITED":
                out["start_cov"], out["start_ft"] = cov, ft
            out["cov"], out["ft"] = cov, ft
            if m.group(5):
                out["corpus_units"] = int(m.group(5))
            continue
        m = _STAT.match(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _error_excerpt(log: str) -> str:
    """The Python exception libFuzzer reported (its traceback's last lines), if any."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "Uncaught Python exception" in line or "ERROR: libFuzzer" in line:
            return "\n".join(lines[i:i + 40])
    return ""


def run_target(target: str, seconds: int, timeout: int, keep: bool = False,
               skip_pending: bool = False) -> dict[str, Any]:
    """Fuzz ``target`` for ``seconds``; the summary dict that is printed as JSON."""
    shm = Path("/dev/shm")
    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-", dir=shm if shm.is_dir() else None))
    corpus = scratch / "corpus"
    (scratch / "tmp").mkdir()  # the harness's own temporary files (TMPDIR), removed with it
    shutil.copytree(CORPUS / target, corpus)
    artifacts = ARTIFACTS / target
    artifacts.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in artifacts.iterdir()}
    log_path = scratch / "fuzz.log"
    cmd = [
        sys.executable, "-m", f"fuzz.{target}",
        f"-max_total_time={seconds}", f"-timeout={timeout}", "-rss_limit_mb=2048",
        "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus),
    ]
    env = dict(os.environ)
    env.pop("FUZZ_SKIP_PENDING", None)
    env["TMPDIR"] = str(scratch / "tmp")
    if skip_pending:
        env["FUZZ_SKIP_PENDING"] = "1"
    started = time.monotonic()
    with log_path.open("w") as log_file:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                  timeout=seconds + timeout + 300, check=False, env=env)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
    elapsed = time.monotonic() - started
    log = log_path.read_text(errors="replace")
    stats = _parse(log)
    found = sorted(p.name for p in artifacts.iterdir()
                   if p.name not in before and _ARTIFACT.search(p.name))
    summary: dict[str, Any] = {
        "target": target,
        "seconds": round(elapsed, 1),
        "skip_pending": skip_pending,
        "exit_code": code,
        "runs": stats.get("number_of_executed_units"),
        "execs_per_sec": stats.get("average_exec_per_sec"),
        "start_cov": stats.get("start_cov"),
        "cov": stats.get("cov"),
        "new_cov": (stats["cov"] - stats["start_cov"]) if "start_cov" in stats else None,
        "start_ft": stats.get("start_ft"),
        "ft": stats.get("ft"),
        "new_units": stats.get("new_units_added"),
        "corpus_units": stats.get("corpus_units"),
        "peak_rss_mb": stats.get("peak_rss_mb"),
        "slowest_unit_sec": stats.get("slowest_unit_time_sec"),
        "crashes": [str(artifacts / name) for name in found],
    }
    if code != 0 or found:
        summary["error"] = _error_excerpt(log)
    if keep or code != 0 or found:
        summary["log"] = str(log_path)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run the targets; 0 when none crashed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", 60)),
                        help="fuzzing time per target (default $FUZZ_SECONDS or 60)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT,
                        help=f"per-input time limit in seconds (default {TIMEOUT})")
    parser.add_argument("--keep", action="store_true", help="keep each scratch folder and log")
    parser.add_argument("--skip-pending", action="store_true",
                        help="do not stop on the known bugs of fuzz/pending/known.txt")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r} (choose from {', '.join(TARGETS)})")
    failed = False
    for target in args.targets or TARGETS:
        summary = run_target(target, args.seconds, args.timeout, args.keep, args.skip_pending)
        failed = failed or summary["exit_code"] != 0 or bool(summary["crashes"])
        print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
