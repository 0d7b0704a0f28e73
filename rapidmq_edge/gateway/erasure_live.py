"""Erasure on a running gateway (``POST /api/v1/erase``, admin tokens; ``rapidmq-edge erase``
uses it while the gateway runs).

What :func:`.erasure.erase_device` does to a stopped gateway's files, done to the live
parts first and then to their files:

1. the client id is refused at CONNECT while the erasure runs (:class:`ErasureGate`);
2. on the event loop, in one step (nothing else runs in between): the broker forgets the
   client (``broker.erasure.erase_client``: its connection closed without its Will, its session,
   in-flight and queued messages, its retained messages and pending Will, its messages
   queued for other clients), the dashboard's counters and client list forget it, the
   intelligence runtime forgets the streams on topics naming it (``DetectorTable.forget``)
   and starts its label caches over (``BatchScorer.forget_labels``: keyed by topic), and
   the feedback sampler drops its sampled rows;
3. the forward queue takes out the messages it published (``ForwardQueue.erase_origin``);
4. ``broker.db`` and ``forward.db`` are scrubbed on the stores' own connections, in their
   writer threads (``store.erase.scrub_live``: secure_delete, checkpoint, and VACUUM up to
   ``VACUUM_MAX_BYTES``): off the event loop, each store's group commits wait meanwhile;
   that pause is measured and reported (``pause_ms``);
5. the other stores as the offline erasure does them (OTA feedback, RBAC grants, OSCORE
   context and token on request), in a thread;
6. the same signed receipt, and the erasure request queued for every upstream.

An id nothing is held about raises :class:`~.erasure.UnknownDevice` (no receipt).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..broker.erasure import erase_client
from ..mqtt import reasons as rc
from ..store.erase import Scrubbed, scrub_live
from ..store.forward_queue import ORIGIN_WHERE
from .erasure import (
    ErasureReport,
    UnknownDevice,
    _broker_deletes,
    check_ids,
    erase_files,
    erasure_requests,
    finish,
)

if TYPE_CHECKING:
    from .assembly import Gateway

__all__ = ["ErasureGate", "LiveErasure"]

log = logging.getLogger(__name__)

#: a store file larger than this is not VACUUMed by a running gateway's erasure: VACUUM
#: rewrites the file while the store's writer waits (~30 ms per MB measured on the 2-core
#: test machine under load, bench/erasure_pause.py); the deletes' content is zeroed in
#: place by secure_delete and the WAL emptied either way
VACUUM_MAX_BYTES = 4 << 20


class ErasureGate:
    """The connections' behaviour hooks (``broker.policy.BehaviourObserver``) in front of
    the threat watch (``inner``, or None): a client id being erased is refused at CONNECT
    (Server busy: it may connect again once the erasure is done)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        #: client ids being erased
        self.erasing: set[str] = set()

    def admit(self, client_id: str) -> int:
        if client_id in self.erasing:
            return rc.SERVER_BUSY
        return self.inner.admit(client_id) if self.inner is not None else 0

    def connected(self, link: Any, client_id: str, username: str | None, reason: int) -> None:
        if self.inner is not None:
            self.inner.connected(link, client_id, username, reason)

    def published(self, client_id: str, topic: str, size: int, ok: bool) -> None:
        if self.inner is not None:
            self.inner.published(client_id, topic, size, ok)

    def subscribed(self, client_id: str, topic_filter: str, ok: bool) -> None:
        if self.inner is not None:
            self.inner.subscribed(client_id, topic_filter, ok)

    def closed(self, link: Any, client_id: str) -> None:
        if self.inner is not None:
            self.inner.closed(link, client_id)

    @property
    def recent(self) -> Any:
        """The threat watch's recent verdicts (why a connection ended), or None."""
        return getattr(self.inner, "recent", None)


def _names(device: str, topic: str) -> bool:
    """True when ``topic`` has ``device`` as one of its levels."""
    return f"/{device}/" in f"/{topic}/"


class LiveErasure:
    """Erasures of a running gateway, one at a time."""

    def __init__(self, gateway: Gateway, gate: ErasureGate) -> None:
        self.gw = gateway
        self.gate = gate
        self._lock = asyncio.Lock()
        self._running: set[asyncio.Future[ErasureReport]] = set()

    async def erase(self, device: str, *, oscore: bool = False, token: str | None = None,
                    queue: str = "erase") -> ErasureReport:
        """Erase what is held about ``device``; raises UnknownDevice, ValueError."""
        check_ids(device, queue)
        async with self._lock:
            self.gate.erasing.add(device)
            try:
                return await self._erase(device, oscore, token, queue)
            finally:
                self.gate.erasing.discard(device)

    async def _erase(self, device: str, oscore: bool, token: str | None,
                     queue: str) -> ErasureReport:
        gw = self.gw
        when = time.time()
        report = ErasureReport(hashlib.sha256(device.encode()).hexdigest())
        pause: dict[str, float] = {}
        started = time.perf_counter()
        self._forget_in_memory(device, report)
        pause["loop"] = time.perf_counter() - started
        fq = gw.forward.queue if gw.forward is not None else None
        if fq is not None:
            if queue == "erase":
                n = await fq.erase_origin(device)
                done = await scrub_live(
                    fq, fq.path, [("DELETE FROM messages WHERE " + ORIGIN_WHERE,
                                   (device, f"/{device}/"))], VACUUM_MAX_BYTES)
                pause["forward"] = done.held
                _add(report, "forward:messages", max(n, done.counts[0]))
                _report_scrub(report, "forward.db", done)
            else:
                n = await fq.count_origin(device)
                if n:
                    report.reported.append(f"forward queue: {n} queued messages kept "
                                           "(queue=report)")
        store = gw.store
        fut = store.commit_future()  # the broker's deletes written first
        if fut is not None:
            await asyncio.shield(fut)
        deletes = _broker_deletes(device)
        done = await scrub_live(store, store.path, [(sql, p) for _t, sql, p in deletes],
                                VACUUM_MAX_BYTES)
        pause["broker"] = done.held
        for (table, _sql, _p), n in zip(deletes, done.counts, strict=True):
            if n > 0 and f"broker:{table}" not in report.erased:
                _add(report, f"broker:{table}", n)  # rows the memory no longer had
        _report_scrub(report, "broker.db", done)
        await asyncio.to_thread(erase_files, gw.config, device, report, oscore=oscore,
                                token=token)
        if oscore and gw.coap is not None:
            gw.coap.sync_oscore()  # its context gone from disk: no longer served, from now
        report.pause_ms = {k: round(v * 1000, 3) for k, v in pause.items()}
        await asyncio.to_thread(finish, gw.config, device, report, None, when)
        queued = self._request_upstream(report)
        if queued:
            report.reported.append(f"erasure request queued for {queued} upstream(s)")
        log.info("erasure: client %s erased (%d rows, %d files; writer paused %s ms)",
                 report.device_sha256[:12], sum(report.erased.values()), len(report.removed),
                 report.pause_ms)
        return report

    def _forget_in_memory(self, device: str, report: ErasureReport) -> None:
        """Everything held in memory, in one step on the loop."""
        gw = self.gw
        for kind, n in erase_client(gw.broker, device).items():
            if n and kind != "connections":
                _add(report, f"broker:{kind}", n)
            elif n:
                report.reported.append("its connection was closed")
        if gw.retention is not None:  # its index must not keep the erased messages
            gw.retention.compact(gw.broker.retained)
        gw.watch.clients.pop(device, None)
        kept = [c for c in gw.watch.closes if c[1] != device]
        if len(kept) != len(gw.watch.closes):
            gw.watch.closes.clear()
            gw.watch.closes.extend(kept)
        gw.traffic.origins.pop(device, None)
        for topic in [t for t in gw.traffic.topics if _names(device, t)]:
            del gw.traffic.topics[topic]
        rt = gw.intelligence
        if rt is not None:
            table = rt.scorer.detectors
            if table is not None:
                streams = [k for k in list(getattr(table, "_dets", ()))
                           if isinstance(k, str) and _names(device, k)]
                for key in streams:
                    table.forget(key)
                if streams:
                    _add(report, "intelligence:streams", len(streams))
            rt.scorer.forget_labels()  # its keys hold topics naming the device
        sampler = gw.feedback.sampler if gw.feedback is not None else None
        if sampler is not None:
            rows = [r for r in sampler.rows if not _names(device, r.topic)]
            if len(rows) != len(sampler.rows):
                _add(report, "feedback:sampled_rows", len(sampler.rows) - len(rows))
                sampler.rows.clear()
                sampler.rows.extend(rows)

    def _finished(self, task: asyncio.Future[ErasureReport]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None and not isinstance(
                task.exception(), ValueError | UnknownDevice):
            log.error("erasure failed: %s", task.exception())

    def _request_upstream(self, report: ErasureReport) -> int:
        """Queue the erasure request for every upstream (through the running queue)."""
        gw = self.gw
        if gw.forward is None:
            return 0
        n = 0
        for upstream, topic, payload in erasure_requests(gw.config, report):
            try:
                gw.forward.queue.put(upstream, 0, topic, payload, 1)
                n += 1
            except Exception as exc:  # QueueFull: reported, the receipt stands
                report.reported.append(f"erasure request for {upstream} not queued: {exc}")
        return n

    async def http(self, body: Any, token_name: str) -> tuple[int, dict[str, Any]]:
        """``POST /api/v1/erase`` (the token already checked as admin): (status, answer)."""
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        unknown = sorted(set(body) - {"device", "oscore", "token", "queue"})
        if unknown:
            return 400, {"error": f"unknown field: {unknown[0]}"}
        device = body.get("device")
        if not isinstance(device, str):
            return 400, {"error": "device: required, must be a string (the client id)"}
        oscore = body.get("oscore", False)
        token = body.get("token")
        queue = body.get("queue", "erase")
        if not isinstance(oscore, bool):
            return 400, {"error": "oscore: must be true or false"}
        if token is not None and not isinstance(token, str):
            return 400, {"error": "token: must be a token name"}
        if not isinstance(queue, str):
            return 400, {"error": 'queue: must be "erase" or "report"'}
        # a client that goes away does not cancel an erasure halfway (aiohttp cancels the
        # handler): it runs to its receipt
        task = asyncio.ensure_future(self.erase(device, oscore=oscore, token=token,
                                                queue=queue))
        self._running.add(task)
        task.add_done_callback(self._finished)
        try:
            report = await asyncio.shield(task)
        except ValueError as exc:
            return 400, {"error": str(exc)}
        except UnknownDevice as exc:
            return 404, {"error": f"unknown device: {exc}"}
        log.info("erasure requested with token %r", token_name)
        return 200, report.as_dict()


def _report_scrub(report: ErasureReport, name: str, done: Scrubbed) -> None:
    if not done.wal_emptied:
        report.reported.append(f"{name}: a reader kept the WAL (emptied at its next "
                               "checkpoint)")
    if not done.vacuumed:
        report.reported.append(
            f"{name}: not vacuumed while running ({done.size / 1e6:.1f} MB > "
            f"{VACUUM_MAX_BYTES / 1e6:.1f} MB): the erased rows were zeroed in place "
            "(secure_delete) and the WAL emptied; their free pages are reused, or given "
            "back by an erasure with the gateway stopped")


def _add(report: ErasureReport, key: str, n: int) -> None:
    report.erased[key] = report.erased.get(key, 0) + n
