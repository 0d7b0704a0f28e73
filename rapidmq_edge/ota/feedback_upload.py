"""The feedback loop's gateway side, with I/O: uploads over the OTA link, verdicts in.

:class:`FeedbackService` is what the gateway assembles when ``[intelligence]`` is on: the
runtime's :class:`~.feedback.FeedbackTap`, the durable :class:`~.verdicts.VerdictStore`,
and (with ``[ota] feedback = true`` and an OTA link) the upload loop :meth:`run`: every
``interval`` seconds (sooner after a verdict) it publishes the buffered rows as one batch
per ``max_rows`` on ``{prefix}/feedback/{gateway_id}/{component}`` and the verdicts not
uploaded yet on ``{prefix}/feedback/{gateway_id}/incidents``, QoS 1, one at a time: a
verdict is marked sent only after its PUBACK; rows whose publish fails go back into the
bounded buffer. While the link is offline the publish waits (the link resends after a
reconnect) and the sampler's buffer keeps its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from ..telemetry import RepeatedLog
from .feedback import (
    INCIDENTS,
    VERDICTS,
    FeedbackSampler,
    FeedbackTap,
    IncidentBook,
    encode_rows,
    encode_verdicts,
    feedback_topic,
)
from .link import OtaLink
from .verdicts import MAX_NOTE, VerdictStore

__all__ = ["FeedbackService", "VerdictRefused"]

log = logging.getLogger(__name__)

_INCIDENT_RE = re.compile(r"[0-9a-f]{1,16}-[0-9]{1,12}")


class VerdictRefused(Exception):
    """A verdict that is not taken: ``status`` is the HTTP status it answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FeedbackService:
    """See the module docstring."""

    def __init__(self, store: VerdictStore, sampler: FeedbackSampler | None = None, *,
                 link: OtaLink | None = None, gateway_id: str = "",
                 prefix: str = "rapidmq/ota", interval: float = 10.0,
                 max_rows: int = 500) -> None:
        self.store = store
        self.sampler = sampler
        self.book = IncidentBook()
        self.tap = FeedbackTap(sampler, self.book)
        self.link = link
        self.gateway_id = gateway_id
        self.prefix = prefix.rstrip("/")
        self.interval = interval
        self.max_rows = max_rows
        self._wake = asyncio.Event()
        self._repeats = RepeatedLog(log)
        self._seq = 0
        #: counters
        self.batches = 0
        self.rows_sent = 0
        self.verdicts_sent = 0
        self.bytes_sent = 0
        self.failures = 0

    @property
    def uploading(self) -> bool:
        """True when the rows and verdicts go upstream (a link and ``feedback`` on)."""
        return self.link is not None

    # -- verdicts (the HTTP API) ---------------------------------------------------------

    async def verdict(self, incident: str, body: Any, by: str) -> dict[str, Any]:
        """Take an operator's verdict on ``incident`` (``body``: the request's JSON); the
        stored document, or :class:`VerdictRefused` (400 bad body, 404 unknown incident)."""
        if not _INCIDENT_RE.fullmatch(incident):
            raise VerdictRefused(404, f"no incident {incident[:40]!r}: ids look like "
                                      "'65f0c2a1-17'")
        if not isinstance(body, dict):
            raise VerdictRefused(400, "body must be a JSON object")
        unknown = set(body) - {"verdict", "note"}
        if unknown:
            raise VerdictRefused(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        verdict, note = body.get("verdict"), body.get("note", "")
        if verdict not in VERDICTS:
            raise VerdictRefused(400, f"verdict must be one of {', '.join(VERDICTS)}, got "
                                      f"{verdict!r:.40}")
        if not isinstance(note, str) or len(note) > MAX_NOTE:
            raise VerdictRefused(400, f"note must be a string of at most {MAX_NOTE} "
                                      "characters")
        known = self.book.get(incident)
        if known is None:
            known = await asyncio.to_thread(self.store.incident, incident)
        if known is None:
            raise VerdictRefused(404, f"no incident {incident!r} was announced by this "
                                      "gateway")
        doc = await asyncio.to_thread(self.store.record, dict(known), verdict, note, by)
        self._wake.set()
        return {**doc, "uploaded": False, "uploading": self.uploading}

    async def http_verdict(self, incident: str, body: Any,
                           by: str) -> tuple[int, dict[str, Any]]:
        """:meth:`verdict` for the HTTP API: (201, the stored verdict) or (status,
        ``{"error": why}``)."""
        try:
            return 201, await self.verdict(incident, body, by)
        except VerdictRefused as exc:
            return exc.status, {"error": str(exc)}

    # -- the upload loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Keep incidents and upload until cancelled (never stops on an error)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.flush()
                self._repeats.clear("flush")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self._repeats("flush", logging.WARNING, "ota: feedback upload failed: %s",
                              exc)

    async def flush(self) -> int:
        """Save new incidents, upload pending verdicts and the buffered rows; returns the
        messages published."""
        changed = self.book.drain()
        if changed:
            await asyncio.to_thread(self.store.remember, changed)
        if self.link is None:
            return 0
        sent = 0
        pending = await asyncio.to_thread(self.store.pending)
        if pending:
            data = encode_verdicts(self.gateway_id, pending)
            await self.link.publish(feedback_topic(self.prefix, self.gateway_id, INCIDENTS),
                                    data, 1)
            await asyncio.to_thread(self.store.mark_sent, pending)
            self.verdicts_sent += len(pending)
            self.bytes_sent += len(data)
            sent += 1
        s = self.sampler
        while s is not None and s.rows:
            rows = s.take(self.max_rows)
            self._seq += 1
            data = encode_rows(self.gateway_id, s.component, rows, seq=self._seq,
                               dropped=s.dropped)
            try:
                await self.link.publish(
                    feedback_topic(self.prefix, self.gateway_id, s.component), data, 1)
            except BaseException:
                s.put_back(rows)
                raise
            self.batches += 1
            self.rows_sent += len(rows)
            self.bytes_sent += len(data)
            sent += 1
        return sent

    def status(self) -> dict[str, Any]:
        """Counters for ``status``."""
        return {"uploading": self.uploading, "batches": self.batches,
                "rows_sent": self.rows_sent, "verdicts_sent": self.verdicts_sent,
                "bytes_sent": self.bytes_sent, "failures": self.failures,
                "incidents_known": len(self.book.known),
                "sampler": self.sampler.status() if self.sampler is not None else None}
