"""The feedback loop's operator side: collect what gateways upload, read it back to train.

:class:`FeedbackArchive` keeps every batch that checks out (:func:`~.feedback.decode_feedback`,
and the gateway in the batch is the one in its topic) as one JSON line in
``DIR/<gateway>/<component>.jsonl`` (verdicts in ``DIR/<gateway>/incidents.jsonl``),
flushed per batch; refused batches are counted by reason and logged once with a count.
:func:`collect` subscribes to ``{prefix}/feedback/+/+`` on a cluster and feeds the archive
until a duration passes or enough rows came (``rapidmq-edge model collect``).
:func:`load_archive` reads a directory back: the rows of one component, the verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..telemetry import RepeatedLog
from .feedback import INCIDENTS, FeedbackBatch, FeedbackError, FeedbackRow, decode_feedback
from .link import DEFAULT_PREFIX, OtaLink

__all__ = ["FeedbackArchive", "collect", "load_archive"]

log = logging.getLogger(__name__)


@dataclass
class FeedbackArchive:
    """Batches on disk under ``root`` (see the module docstring)."""

    root: Path
    prefix: str = DEFAULT_PREFIX
    batches: int = 0
    rows: int = 0
    verdicts: int = 0
    refused: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.prefix = self.prefix.rstrip("/")
        self._repeats = RepeatedLog(log)

    def add(self, topic: str, data: bytes) -> FeedbackBatch | None:
        """Check and keep one message of ``{prefix}/feedback/<gateway>/<component>``;
        None when it was refused (counted)."""
        head = f"{self.prefix}/feedback/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        try:
            if len(parts) != 2:
                raise FeedbackError("wrong-topic", f"{topic!r} is not {head}<gateway>/<part>")
            batch = decode_feedback(data)
            if batch.gateway != parts[0] or batch.component != parts[1]:
                raise FeedbackError("wrong-topic", f"a batch of {batch.gateway}/"
                                                   f"{batch.component} on {topic!r}")
        except FeedbackError as exc:
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            self._repeats(f"refused:{exc.reason}", logging.WARNING,
                          "feedback: batch on %s refused: %s", topic, exc)
            return None
        if os.sep in batch.gateway or batch.gateway in (".", ".."):
            self.refused["wrong-topic"] = self.refused.get("wrong-topic", 0) + 1
            return None
        d = self.root / batch.gateway
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{batch.component}.jsonl", "ab") as fh:
            fh.write(data.rstrip(b"\n") + b"\n")
        self.batches += 1
        self.rows += len(batch.rows)
        self.verdicts += len(batch.verdicts)
        return batch

    def stats(self) -> dict[str, Any]:
        """What came so far."""
        return {"batches": self.batches, "rows": self.rows, "verdicts": self.verdicts,
                "refused": dict(self.refused)}


async def collect(url: str | Sequence[str], out_dir: Path, *, prefix: str = DEFAULT_PREFIX,
                  duration: float | None = None, min_rows: int | None = None,
                  min_verdicts: int = 0, username: str | None = None, password: str | None = None,
                  tls: ssl.SSLContext | None = None, version: int = 5,
                  client_id: str | None = None) -> FeedbackArchive:
    """Subscribe to every gateway's feedback and keep it in ``out_dir`` until ``duration``
    seconds passed or ``min_rows`` rows and ``min_verdicts`` verdicts came (whichever first;
    neither: until cancelled)."""
    archive = FeedbackArchive(Path(out_dir), prefix)
    done = asyncio.Event()

    async def on_message(topic: str, payload: bytes, retained: bool) -> None:
        if archive.add(topic, payload) is not None and min_rows is not None \
                and archive.rows >= min_rows and archive.verdicts >= min_verdicts:
            done.set()

    urls = [url] if isinstance(url, str) else list(url)
    cid = client_id or f"feedback-collector-{os.getpid()}-{os.urandom(3).hex()}"
    link = OtaLink(urls, cid, client_id=cid, prefix=prefix, username=username,
                   password=password, tls=tls, version=version, will=False,
                   on_message=on_message)
    runner = asyncio.create_task(link.run())
    try:
        await link.subscribe(f"{archive.prefix}/feedback/+/+", 1)
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
        log.info("feedback: %s in %.1f s", archive.stats(), time.monotonic() - started)
    finally:
        await link.stop()
        await asyncio.wait_for(runner, 5)
    return archive


def load_archive(root: Path, component: str) -> tuple[list[FeedbackRow], list[dict[str, Any]]]:
    """The rows of ``component`` and the verdicts (newest per incident) kept under ``root``
    (every gateway's directory; a line that does not decode is skipped and logged)."""
    rows: list[FeedbackRow] = []
    verdicts: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(root).glob("*/*.jsonl")):
        if path.stem not in (component, INCIDENTS):
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                batch: FeedbackBatch = decode_feedback(line)
            except FeedbackError as exc:
                log.warning("feedback: %s:%d skipped: %s", path, n, exc)
                continue
            rows.extend(batch.rows)
            for v in batch.verdicts:
                old = verdicts.get(v["incident"])
                if old is None or v.get("at", 0) >= old.get("at", 0):
                    verdicts[v["incident"]] = v
    return rows, list(verdicts.values())
