"""``data_dir/status.json``: the gateway's state for ``rapidmq-edge status`` and humans.

The gateway rewrites the file atomically every few seconds; the CLI only reads it, so
``status`` works without network access to the gateway and without credentials.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..telemetry import RepeatedLog
from .status_intelligence import intelligence_lines

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
LOCK_FILE = "gateway.lock"
#: ``rapidmq-edge status`` exit codes (LSB-like): running; running but its status is stale
#: or unreadable; not running
EXIT_RUNNING, EXIT_STALE, EXIT_NOT_RUNNING = 0, 1, 3


def lock_holder(data_dir: Path, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid of the process holding ``data_dir/gateway.lock`` (the running gateway), read
    from ``/proc/locks`` without touching the lock; None when nobody holds it."""
    try:
        st = (data_dir / LOCK_FILE).stat()
        table = locks.read_text()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2148381 0 EOF" (blocked waiters: "->")
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
            try:
                return int(parts[4])
            except ValueError:
                return None
    return None


@dataclass(frozen=True, slots=True)
class Liveness:
    """What ``status`` concludes: ``running``, ``stale`` (running, status not current) or
    ``not running``; the gateway's pid and how old its status file is."""

    state: str
    pid: int | None
    age: float | None
    why: str

    @property
    def exit_code(self) -> int:
        return {"running": EXIT_RUNNING, "stale": EXIT_STALE}.get(self.state, EXIT_NOT_RUNNING)


def assess(holder: int | None, data: dict[str, Any] | None, now: float) -> Liveness:
    """Running or not from the lock (never from the file's age alone); stale when the
    status file is missing, from another process, or older than three intervals."""
    age = now - float(data.get("written_at", 0)) if data else None
    if holder is None:
        return Liveness("not running", None, age, "no process holds the data directory lock")
    if data is None:
        return Liveness("stale", holder, None, "it has written no readable status yet")
    if data.get("pid") not in (None, holder):
        return Liveness("stale", holder, age, f"the status file is from pid {data.get('pid')}")
    assert age is not None
    if age > 3 * float(data.get("interval", 5)) + 5:
        return Liveness("stale", holder, age,
                        f"its status was last written {_age(age)} ago (disk full?)")
    return Liveness("running", holder, age, "")


#: the status file is padded with spaces (valid JSON whitespace) to a multiple of this, so
#: that a rewrite in place rarely needs a block the disk may not have
_BLOCK = 4096


def write_status(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + rename).

    On a full disk (no block for the temp file) the file is rewritten in place instead,
    when the new text fits in the blocks it already has; otherwise OSError: the old file
    stays, and ``rapidmq-edge status`` reports its age."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str).encode() + b"\n"
    text += b" " * (-len(text) % _BLOCK)
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(text)
        os.replace(tmp, path)
        return
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            old = path.stat().st_size
        except FileNotFoundError:
            raise exc from None
        if len(text) > old:
            raise
    with open(path, "r+b") as fh:  # the same blocks: a reader may see it half-written once
        fh.write(text.ljust(old))


async def keep_status(path: Path, snapshot: Callable[[], dict[str, Any]], every: float) -> None:
    """Rewrite the status file every ``every`` seconds, forever; a failure (a full disk)
    is logged once with a count and never stops the gateway (the file is only a view)."""
    repeats = RepeatedLog(log)
    while True:
        try:
            write_status(path, {"written_at": time.time(), "interval": every, **snapshot()})
        except OSError as exc:
            repeats("write", logging.WARNING, "cannot write the status file %s: %s", path, exc)
        else:
            repeats.clear("write", "status file %s written again", path)
        await asyncio.sleep(every)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


def render(data: dict[str, Any], now: float | None = None,
           live: Liveness | None = None) -> str:
    """A short human summary of a status document (``live``: what :func:`assess` found)."""
    now = time.time() if now is None else now
    lines = []
    age = now - float(data.get("written_at", 0))
    if live is None:
        stale = age > 3 * float(data.get("interval", 5)) + 5
        head = f"NOT RUNNING? (status is {_age(age)} old)" if stale else "running"
    elif live.state == "running":  # the figures are the last snapshot's, not this moment's
        head = f"running (pid {live.pid}); figures from {_age(max(age, 0.0))} ago"
    elif live.state == "stale":
        head = f"RUNNING (pid {live.pid}), but {live.why}"
    else:
        head = f"NOT RUNNING ({live.why}); last status from {_age(age)} ago"
    lines.append(f"gateway {data.get('gateway', '?')}: {head}")
    b = data.get("broker", {})
    lines.append(
        f"  clients {b.get('clients/connected', '?')} connected, "
        f"{b.get('clients/total', '?')} sessions; messages in {b.get('messages/received', '?')}"
        f", out {b.get('messages/sent', '?')}, dropped {b.get('publish/messages/dropped', '?')}"
    )
    disk = data.get("disk")
    if disk:
        lines.append(
            f"  disk: {_size(disk.get('free_bytes'))} free of {_size(disk.get('total_bytes'))}"
            f", reserve {_size(disk.get('reserve_bytes'))}, ballast "
            f"{_size(disk.get('ballast_bytes'))}"
            + ("; REFUSING new messages (below the reserve)" if disk.get("below_reserve")
               else ""))
    proc = data.get("process")
    if proc:
        lag = proc.get("loop_lag", {})
        lines.append(
            f"  process {proc.get('pid', '?')}: RSS {_size(proc.get('rss_bytes', 0))}, "
            f"{proc.get('open_fds', '?')} open files; event loop lag p99 "
            f"{lag.get('p99_ms', '?')} ms (max {lag.get('max_ms', '?')} ms)"
        )
    lines += intelligence_lines(data.get("intelligence"))
    fwd = data.get("forwarding")
    if not fwd:
        lines.append("  no upstreams configured (local broker only)")
        return "\n".join(lines)
    lines.append(
        f"  queue {fwd['queued']} messages, {fwd['queued_bytes']} bytes; drops "
        + (", ".join(f"{k} {v}" for k, v in fwd["drops"].items() if v) or "none")
    )
    if fwd.get("forecast"):
        lines.append(f"  forecast: {fwd['forecast']['text']}")
    prot = fwd.get("protection")
    if prot:
        lines.append(
            f"  post-quantum: {prot['sealed_batches']} batches signed, {prot['open_leaves']} "
            f"messages in the open batch, sessions {prot['sessions'] or 'none'} "
            f"({prot.get('accelerator', 'python')} path)"
        )
    for name, up in fwd["upstreams"].items():
        state = f"connected to {up['current_url']}" if up["connected"] else "DISCONNECTED"
        hb = up.get("last_heartbeat")
        hb_text = "no heartbeat yet" if hb is None else (
            f"heartbeat {_age(now - hb)} ago ({up.get('heartbeat_rtt_ms')} ms)"
        )
        pub = up.get("last_puback")
        lines.append(
            f"  upstream {name}: {state}; {hb_text}; last PUBACK "
            + (f"{_age(now - pub)} ago" if pub else "never")
        )
        lines.append(
            f"    queued {up['queued']} (oldest {_age(up['oldest_age'])}), in flight "
            f"{up['inflight']}, acked {up['acked']}"
        )
        if up.get("forecast"):
            lines.append(f"    forecast: {up['forecast']['text']}")
        pol = up.get("endpoint_policy")
        if pol and pol.get("policy") != "ordered":
            eps = ", ".join(
                f"{e['url']} " + (f"~{e['expected_ms']} ms" if "expected_ms" in e
                                  else f"{e['acks']} acks")
                for e in pol["endpoints"].values()
            )
            lines.append(f"    endpoints ({pol['policy']}, {pol['switches']} switches): {eps}")
        if up.get("last_error") and not up["connected"]:
            lines.append(f"    last error: {up['last_error']}")
    return "\n".join(lines)
