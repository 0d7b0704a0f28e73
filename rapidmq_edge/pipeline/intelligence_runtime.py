"""The edge-intelligence runtime in the message path (``[intelligence]``).

It is the broker's tap in the forwarder's place (the gateway's assembly chooses one or the
other) and drives the forwarder with the classes it scores. Messages are collected into
micro-batches (at most ``batch_window_ms``, or ``max_batch`` messages) and scored together
(:mod:`~rapidmq_edge.intelligence.scoring`) in one worker thread (onnxruntime releases
the GIL; stream state is touched by that thread only, in order): the **priority** model
picks the store class of every message whose ``[[forward]]`` rule has no explicit
``priority``; the **anomaly** detector judges each numeric reading against what its stream
learnt (:mod:`~rapidmq_edge.intelligence.stream_detector`, on the device's clock when the
reading carries one) and an anomaly episode opens an **incident**, announced as an alert
(local ``$edge/alerts/<kind>/<topic>`` and upstream in the highest class) when it opens
and when it closes (:mod:`~rapidmq_edge.intelligence.incidents`); while the forward backlog
or the disk is past a threshold, routine readings are **summarised** per stream (count /
min / max / mean per window) instead of forwarded one by one; an open window is stored in
the forward queue's database in the same group commit that the acknowledgement of its
readings waits for, so a crash loses no acknowledged reading (the restarted gateway queues
the windows it finds).
Back on the event loop the batch is queued in arrival order, and the publishers'
acknowledgements wait for :meth:`IntelligenceRuntime.commit_future` (scored, queued, and
committed).

The **threat** watch (:mod:`~rapidmq_edge.intelligence.threat`) is fed by the connection
hooks (the assembly hands :attr:`IntelligenceRuntime.watch` to each connection) and scored
on a timer. A model that cannot be verified is replaced by the rules
(:mod:`~rapidmq_edge.intelligence.models`); the runtime says so in the log and in
``$SYS/broker/intelligence/...`` (its :meth:`IntelligenceRuntime.snapshot`). The models,
features and detectors are :mod:`rapidmq_edge.intelligence`'s; this module puts them in
the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from ..broker.message import Message, PublishRefused
from ..config.forwarding import UpstreamSettings
from ..config.intelligence import IntelligenceSettings
from ..intelligence.features import PRIORITY_LABELS
from ..intelligence.incidents import DETECTOR_VERSION, Incidents
from ..intelligence.models import Scorer, load_scorer
from ..intelligence.scoring import BatchScorer, Scored
from ..intelligence.stream_detector import DetectorParams
from ..intelligence.summarise import Summariser, Summary
from ..intelligence.threat import ClientWatch, Evidence, Verdict
from ..store.errors import QueueError
from ..store.forward_queue import ForwardQueue
from .forwarder import Forwarder
from .model_control import ModelControl

log = logging.getLogger(__name__)

#: ``Message.origin`` of the runtime's own messages (alerts)
ORIGIN = "$edge"
#: the backlog / disk criteria switch off again below this share of their threshold
HYSTERESIS = 0.8
#: key prefix of open summary windows in the forward queue's ``state`` table
SUMMARY_KEY = "summary:"


class FeedbackHook(Protocol):
    """Where scored batches and announced incidents go for the feedback loop."""

    def offer(self, batch: Sequence[tuple[Message, list[Any], float]], labels: Sequence[int],
              scorer: Scorer) -> None: ...

    def incident(self, payload: dict[str, Any]) -> None: ...


class IntelligenceRuntime:
    """Micro-batched scoring between the broker and the durable forward queue."""

    def __init__(self, settings: IntelligenceSettings, forwarder: Forwarder | None,
                 queue: ForwardQueue | None, publish: Callable[[Message], object],
                 upstreams: Sequence[UpstreamSettings] = (), gateway_id: str = "",
                 data_dir: Path | None = None,
                 scorers: Mapping[str, Scorer] | None = None) -> None:
        """``forwarder`` and ``queue``: the forwarding path (None without ``[[upstream]]``);
        ``publish``: local publishing (alerts); ``upstreams``: where alerts of unforwarded
        streams go; ``data_dir``: the disk whose usage turns summarising on; ``scorers``:
        validated models used instead of the shipped ones where the mode is "model" (the
        OTA slots' active models, :mod:`rapidmq_edge.ota.activate`)."""
        self.settings = s = settings
        self.forwarder = forwarder
        self.queue = queue
        self.publish = publish
        self.data_dir = data_dir
        if forwarder is None and s.priority != "off":
            log.info("intelligence: no [[upstream]]: priority scoring has nothing to drive")
        ota = dict(scorers or {})
        prio_mode = s.priority if forwarder is not None else "off"
        self.priority = (ota["priority"] if prio_mode == "model" and "priority" in ota
                         else load_scorer(s.models_dir, "priority", prio_mode))
        #: the anomaly detector's parameters (None: anomaly detection off)
        self.detector = (DetectorParams(calm_readings=s.episode_close_readings)
                         if s.anomaly != "off" else None)
        self.incidents = Incidents(s.alerts_per_stream_hour, s.streams,
                                   self.detector.p_open if self.detector else 0.0)
        #: the fault-kind classifier beside the detector (young streams, open episodes)
        self.anomaly = (load_scorer(s.models_dir, "anomaly", "model")
                        if self.detector is not None else None)
        self.threat = (ota["threat"] if s.threat == "model" and "threat" in ota
                       else load_scorer(s.models_dir, "threat", s.threat))
        self.watch = (ClientWatch(self.threat, s.threat_action, s.ban_s, s.threat_min_events,
                                  s.threat_min_confidence, throttle_rate=s.throttle_rate,
                                  throttle_confidence=s.throttle_min_confidence,
                                  exempt_users=s.threat_exempt_users,
                                  exempt_clients=s.threat_exempt_clients,
                                  evidence=Evidence(flood_rate=s.flood_rate,
                                                    flood_factor=s.flood_factor,
                                                    burst=s.flood_burst),
                                  on_verdict=self._threat_alert)
                      if s.threat != "off" else None)
        self._all_upstreams = [
            (u.name, u.topic_prefix.replace("{gateway_id}", gateway_id)) for u in upstreams
        ] if forwarder is not None else []
        self._values_needed = s.anomaly != "off" or s.summarising
        #: features + models of a batch (the worker's side, :mod:`.scoring`)
        self.scorer = BatchScorer(self.priority, self.detector, self._values_needed,
                                  self.anomaly)
        #: shadow candidates and atomic swaps of the priority and threat models (OTA)
        self.models = ModelControl(self)
        self.summariser = Summariser(s.summary_window_s)
        self.pressure = False
        self.pressure_reason = ""
        self.pressure_episodes = 0
        self._window = s.batch_window_ms / 1000.0
        self._pending: list[tuple[Message, list[Any], float]] = []
        self._since = 0.0  # time.monotonic() of the first pending message
        self._fut: asyncio.Future[None] | None = None
        self._busy = False
        self._busy_fut: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="rmqe-score")
                          if s.worker_thread else None)
        self._tasks: list[asyncio.Task[None]] = []
        # counters
        self.scored = 0
        self.batches = 0
        #: alerts by (kind, state: open / close / threat)
        self.alerts_by_kind: dict[tuple[str, str], int] = {}
        #: the feedback loop's hook (``ota.feedback.FeedbackTap``): sampled rows, incidents
        self.feedback: FeedbackHook | None = None
        #: called on the loop with each batch's scoring seconds (the /metrics histogram)
        self.inference_observer: Callable[[float], None] | None = None
        self.worker_seconds = 0.0
        self.loop_seconds_max = 0.0
        self.alerts = 0
        self.alerts_not_queued = 0
        self.forward_refused = 0
        self.by_class = [0, 0, 0, 0]
        self._rate: tuple[float, int] = (time.monotonic(), 0)

    @property
    def fallback(self) -> list[str]:
        """Models that were wanted but replaced by the rules."""
        return [sc.name for sc in (self.priority, self.threat) if sc.fallback]

    # -- the message path ----------------------------------------------------------

    def tap(self, msg: Message) -> None:
        """Broker tap: collect the message into the current micro-batch."""
        if msg.topic.startswith("$"):
            return
        fwd = self.forwarder
        targets = fwd.targets(msg.topic) if fwd is not None else []
        if not targets and not self._values_needed:
            return
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append((msg, targets, time.time()))
        if len(self._pending) >= self.settings.max_batch:
            self._flush()
        elif self._timer is None and not self._busy:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._window, self._flush)

    def commit_future(self) -> asyncio.Future[None] | None:
        """Resolved when every message tapped so far is scored, queued and committed."""
        if self._pending:
            if self._fut is None:
                self._fut = self._new_future()
            return self._fut
        if self._busy:
            if self._busy_fut is None:
                self._busy_fut = self._new_future()
            return self._busy_fut
        return None

    def _new_future(self) -> asyncio.Future[None]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.create_future()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return  # the running batch flushes the next one when it is done
        batch, self._pending = self._pending, []
        since = self._since
        self._busy_fut, self._fut = self._fut, None
        self._busy = True
        msgs = [m for m, _, _ in batch]
        need = [i for i, (_, targets, _) in enumerate(batch)
                if targets and any(not r.priority_explicit for r, _ in targets)]
        args = ([m.topic for m in msgs], [m.payload for m in msgs], [m.qos for m in msgs],
                [m.retain for m in msgs], [t for _, _, t in batch], need)
        if self._executor is None or len(batch) <= self.settings.inline_max_batch:
            # small batches: scoring takes tens of µs, less than handing over to a thread
            # that then waits for the GIL (up to the 5 ms switch interval) behind the loop
            self._scored(batch, self._score(*args), since)
            return
        loop = self._loop or asyncio.get_running_loop()
        done = loop.run_in_executor(self._executor, self._score, *args)
        done.add_done_callback(lambda f: self._scored(batch, f, since))

    def _score(self, topics: list[str], payloads: list[bytes], qos: list[int],
               retain: list[bool], times: list[float], need: list[int]) -> Scored:
        """Features and models for one batch (in the worker thread)."""
        return self.scorer.score(topics, payloads, qos, retain, times, need)

    def _scored(self, batch: list[tuple[Message, list[Any], float]],
                result: Scored | asyncio.Future[Scored], since: float | None = None) -> None:
        """Back on the loop: act on the scores and queue the batch in arrival order; its
        group commit counts from ``since`` (``time.monotonic()`` of the batch's first
        arrival), not from the put: the micro-batch window is part of that wait."""
        t0 = time.perf_counter()
        fut, self._busy_fut = self._busy_fut, None
        failure: BaseException | None = None
        try:
            r = result.result() if isinstance(result, asyncio.Future) else result
        except Exception as exc:  # a scoring bug must not lose messages: rule classes
            log.exception("intelligence: scoring a batch of %d failed", len(batch))
            r = Scored(None, [None] * len(batch), None, None, 0.0)
            failure = None if self.forwarder is not None else exc
        self.batches += 1
        self.scored += len(batch)
        self.worker_seconds += r.seconds
        if self.inference_observer is not None:
            self.inference_observer(r.seconds)
        classes = self.settings.classes
        summarise = self.pressure and self.queue is not None
        sum_classes = self.settings.summarise_classes
        summ = self.summariser
        touched: set[str] = set()
        fwd = self.forwarder
        for i, (msg, targets, t) in enumerate(batch):
            cls = None
            if r.priority is not None and r.priority[i] >= 0:
                cls = classes[PRIORITY_LABELS[r.priority[i]]]
                self.by_class[cls] += 1
            value = r.values[i]
            verdict = r.verdicts[i] if r.verdicts is not None else None
            anomalous = False  # in an incident: forwarded one by one, never summarised
            if verdict is not None and value is not None:
                anomalous = verdict.in_episode or verdict.opens
                if anomalous or msg.topic in self.incidents.open:
                    at = r.times[i] if r.times is not None else t
                    for event in self.incidents.update(msg.topic, at, value, verdict):
                        self._alert(event.incident.kind, msg.topic, event.payload, targets)
            if not targets or fwd is None:
                continue
            if summarise and value is not None and not anomalous:
                eff = min(rule.priority if rule.priority_explicit or cls is None else cls
                          for rule, _ in targets)
                if eff in sum_classes:
                    stream = msg.topic
                    summ.add(stream, t, value, eff, None if stream in summ.open else [
                        [rule.upstream, up, min(rule.qos, 1), rule.ttl, rule.filter]
                        for rule, up in targets])
                    touched.add(stream)
                    continue
            try:
                fwd(msg, cls)
            except PublishRefused as exc:  # this message only: the batch is queued
                self.forward_refused += 1
                msg.refused = exc
        q = self.queue
        if touched and q is not None:  # durable with the batch: before its acknowledgements
            for stream in touched:
                q.stage(SUMMARY_KEY + stream, summ.open[stream].state())
        if since is not None and q is not None:
            q.commit_arrived(since)
        self._resolve(fut, failure)
        if r.shadow is not None:  # the candidate, after the batch's own path is done
            self._run_shadow(r.shadow)
        fb = self.feedback
        if fb is not None and r.priority is not None:  # a sample, after the batch is handed on
            fb.offer(batch, r.priority, self.scorer.priority)
        self._busy = False
        self.loop_seconds_max = max(self.loop_seconds_max, time.perf_counter() - t0)
        if self._pending:
            if len(self._pending) >= self.settings.max_batch:
                self._flush()
            elif self._timer is None:
                loop = self._loop or asyncio.get_running_loop()
                self._timer = loop.call_later(self._window, self._flush)

    def _run_shadow(self, job: Callable[[], None]) -> None:
        """A shadow run in the worker thread (before the next batch there), else soon on the
        loop; it reports its own failures and never raises into the path."""
        if self._executor is not None:
            with contextlib.suppress(RuntimeError):  # shut down: the candidate skips it
                self._executor.submit(job)
            return
        (self._loop or asyncio.get_running_loop()).call_soon(job)

    def _resolve(self, fut: asyncio.Future[None] | None, failure: BaseException | None) -> None:
        if fut is None or fut.done():
            return
        if failure is not None:
            fut.set_exception(QueueError(f"not queued: {failure}"))
            return
        q = self.queue.commit_future() if self.queue is not None else None
        if q is None:
            fut.set_result(None)
            return

        def chain(f: asyncio.Future[None]) -> None:
            if fut.done():
                return
            if f.cancelled():
                fut.set_exception(QueueError("commit cancelled"))
            elif f.exception() is not None:
                fut.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(None)

        q.add_done_callback(chain)

    # -- alerts --------------------------------------------------------------------

    def _alert(self, kind: str, topic: str, payload: dict[str, Any],
               targets: list[Any]) -> None:
        """Announce an incident's opening or closing on ``alert_topic/<kind>/<topic>``."""
        self.alerts += 1
        state = payload.get("state")
        key = (kind, str(state))
        self.alerts_by_kind[key] = self.alerts_by_kind.get(key, 0) + 1
        if state == "open":
            log.info("intelligence: %s on %s (incident %s, reading %s, expected %s, score "
                     "%.4f)", kind, topic, payload["incident"], payload["reading"],
                     payload["expected"], payload["score"])
        else:
            log.info("intelligence: %s on %s over (incident %s, %d readings)", kind, topic,
                     payload["incident"], payload["readings"])
        if self.feedback is not None:
            self.feedback.incident(payload)
        body = json.dumps({**payload, "model": DETECTOR_VERSION},
                          separators=(",", ":")).encode()
        ups = ({rule.upstream: up[: len(up) - len(topic)] for rule, up in targets}
               if targets else None)
        self._emit(f"{kind}/{topic}", body, ups)

    def _emit(self, path: str, payload: bytes, upstreams: dict[str, str] | None) -> None:
        """Publish an alert locally (``alert_topic/path``) and queue it in the highest class
        for ``upstreams`` (name -> topic prefix; None: every upstream)."""
        s = self.settings
        self.publish(Message(f"{s.alert_topic}/{path}", payload, 1, False, {}, None, ORIGIN))
        if self.queue is None:
            return
        for name, prefix in (upstreams or dict(self._all_upstreams)).items():
            try:
                self.queue.put(name, 0, f"{prefix}{s.alert_upstream_topic}/{path}", payload, 1)
            except QueueError as exc:
                self.alerts_not_queued += 1
                log.warning("intelligence: alert %s not queued for %s: %s", path, name, exc)

    def _threat_alert(self, v: Verdict) -> None:
        """A threat verdict as an alert: ``alert_topic/threat/<label>/<client id>``."""
        self.alerts += 1
        key = (f"threat/{v.label}", "open")
        self.alerts_by_kind[key] = self.alerts_by_kind.get(key, 0) + 1
        payload = json.dumps({
            "kind": v.label, "client": v.client, "action": v.action,
            "score": v.confidence, "evidence": v.evidence, "model": self.threat.version,
            "source": self.threat.source, "at": round(v.at, 3),
        }, separators=(",", ":"), default=str).encode()
        self._emit(f"threat/{v.label}/{v.client}", payload, None)

    # -- summaries and pressure ----------------------------------------------------

    def check_pressure(self) -> bool:
        """Look at the backlog and the disk; switch summarising on or off."""
        if self.queue is None:
            return False
        s = self.settings
        st = self.queue.stats()
        disk = 0.0
        if s.summarise_disk_percent and self.data_dir is not None:
            with contextlib.suppress(OSError):
                du = shutil.disk_usage(self.data_dir)
                disk = 100.0 * du.used / du.total if du.total else 0.0
        checks = [
            ("backlog messages", st["messages"], s.summarise_backlog_messages),
            ("backlog bytes", st["bytes"], s.summarise_backlog_bytes),
            ("disk percent", disk, s.summarise_disk_percent),
        ]
        over = [f"{name} {value:g} >= {limit:g}" for name, value, limit in checks
                if limit and value >= limit]
        if over and not self.pressure:
            self.pressure = True
            self.pressure_episodes += 1
            self.pressure_reason = "; ".join(over)
            log.warning("intelligence: summarising routine readings (%s)", self.pressure_reason)
        elif self.pressure and not over and all(
                not limit or value < HYSTERESIS * limit for _, value, limit in checks):
            self.pressure = False
            log.info("intelligence: backlog and disk below their thresholds: forwarding every "
                     "reading again")
            self.emit_summaries(everything=True)
        return self.pressure

    def emit_summaries(self, everything: bool = False) -> int:
        """Queue the summaries whose window is over (all when ``everything``)."""
        if self.queue is None:
            return 0
        n = 0
        suffix = self.settings.summary_suffix
        for summary in self.summariser.due(time.time(), everything):
            payload = summary.payload()
            for upstream, up_topic, qos, ttl, filt in summary.targets:
                try:
                    self._put_summary(summary.priority, upstream, filt, up_topic + suffix,
                                      payload, qos, ttl)
                    n += 1
                except QueueError as exc:
                    log.warning("intelligence: summary of %s not queued: %s", summary.stream,
                                exc)
            self.queue.stage(SUMMARY_KEY + summary.stream, None)  # in the same commit
        return n

    def _put_summary(self, priority: int, upstream: str, filt: str, topic: str,
                     payload: bytes, qos: int, ttl: float) -> None:
        """Queue one summary as its ``[[forward]]`` rule (found again by filter and
        upstream) queues messages: sealed and / or signed when the rule says so."""
        assert self.queue is not None
        fwd = self.forwarder
        rule = fwd.rule(filt, upstream) if fwd is not None else None
        if fwd is not None and rule is not None:
            fwd.put(rule, priority, topic, payload, b"", ttl or None)
        else:  # the rule is gone from the configuration since the window was opened
            self.queue.put(upstream, priority, topic, payload, qos, b"", ttl or None)

    def restore_summaries(self) -> int:
        """Queue the summary windows a previous run left open (crash or kill)."""
        if self.queue is None:
            return 0
        stored = self.queue.load_state(SUMMARY_KEY)
        for key, data in stored.items():
            try:
                self.summariser.restore(Summary.from_state(data))
            except ValueError as exc:
                log.error("intelligence: stored summary window %s unreadable (%s): dropped",
                          key, exc)
                self.queue.stage(key, None)
        if stored:
            log.warning("intelligence: %d summary window(s) left open by the previous run: "
                        "queued now", len(self.summariser.open))
        return self.emit_summaries(everything=True)

    # -- background tasks ----------------------------------------------------------

    def start(self) -> None:
        """Start the timers (call inside the running loop)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        s = self.settings
        self.restore_summaries()
        if s.summarising and self.queue is not None:
            self._tasks.append(loop.create_task(self._every(s.pressure_check_s,
                                                            self.check_pressure)))
            self._tasks.append(loop.create_task(self._every(
                min(s.summary_window_s / 4, 1.0), self.emit_summaries)))
        if self.watch is not None:
            self._tasks.append(loop.create_task(self._every(s.threat_interval_s,
                                                            self.watch.tick)))
        log.info("intelligence: priority %s, anomaly %s, threat %s (batch %.1f ms / %d)",
                 self._describe(self.priority),
                 f"detector {DETECTOR_VERSION}" if self.detector is not None else "off",
                 self._describe(self.threat), s.batch_window_ms, s.max_batch)

    @staticmethod
    def _describe(sc: Scorer) -> str:
        if sc.source == "model":
            return f"model {sc.version}"
        return "rules (fallback)" if sc.fallback else sc.source

    @staticmethod
    async def _every(interval: float, fn: Any) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                fn()
            except Exception:  # a timer must keep running
                log.exception("intelligence: %s failed", getattr(fn, "__name__", fn))

    async def stop(self) -> None:
        """Score and queue what is pending, queue open summaries, stop the worker."""
        for task in self._tasks:
            task.cancel()
        for _ in range(200):
            if self._busy:
                await asyncio.sleep(0.005)
                continue
            if not self._pending:
                break
            self._flush()
        self.emit_summaries(everything=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- metrics -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything the runtime counts (``rapidmq-edge status``, ``$SYS``)."""
        now = time.monotonic()
        t_prev, n_prev = self._rate
        rate = (self.scored - n_prev) / (now - t_prev) if now > t_prev else 0.0
        if now - t_prev >= 5.0:
            self._rate = (now, self.scored)
        per_msg = self.worker_seconds / self.scored * 1e6 if self.scored else 0.0
        return {
            "models": {
                **{sc.name: {"source": sc.source, "version": sc.version,
                             "fallback": sc.fallback, **self.models.shadow_status(sc.name)}
                   for sc in (self.priority, self.threat)},
                "anomaly": {"source": "detector" if self.detector is not None else "off",
                            "version": DETECTOR_VERSION, "fallback": False,
                            "classifier": self.anomaly.version if self.anomaly is not None
                            and self.anomaly.source == "model" else "off"},
            },
            "fallback_active": bool(self.fallback),
            "scored": self.scored,
            "scores_per_s": round(rate, 1),
            "batches": self.batches,
            "mean_batch": round(self.scored / self.batches, 1) if self.batches else 0.0,
            "score_us_per_message": round(per_msg, 2),
            "loop_ms_max": round(self.loop_seconds_max * 1000, 3),
            "priority_cache_hits": self.scorer.cache_hits,
            "streams": len(self.scorer.detectors) if self.scorer.detectors is not None else 0,
            "device_times": self.scorer.device_times,
            "incidents": {"open": len(self.incidents.open), "opened": self.incidents.opened,
                          "closed": self.incidents.closed,
                          "suppressed": self.incidents.suppressed},
            "classes": dict(zip(("alarm", "high", "normal", "bulk"), self.by_class,
                                strict=True)),
            "alerts": self.alerts,
            "alerts_suppressed": self.incidents.suppressed,
            "alerts_not_queued": self.alerts_not_queued,
            "forward_refused": self.forward_refused,
            "summarising": self.pressure,
            "summarising_reason": self.pressure_reason if self.pressure else "",
            "summarising_episodes": self.pressure_episodes,
            "summarised_readings": self.summariser.readings,
            "summaries": self.summariser.emitted,
            "threat": self.watch.status() if self.watch is not None else None,
        }
