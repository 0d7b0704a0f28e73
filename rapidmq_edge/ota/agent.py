"""The gateway's side of OTA: manifests in, models through shadow to active, state out.

:class:`OtaAgent` subscribes (over its :class:`~.link.OtaLink`) to the retained manifests of
its class, ``{prefix}/manifest/<class>/<component>``, and of itself,
``{prefix}/manifest/gw/<gateway>/<component>`` (a staged rollout's early stages). For each
component, the newest manifest wins:

1. verify (:func:`~.manifest.verify_envelope`: signatures by a trust anchor, class, gateway
   version, size, chunking, sequence against the accepted one) and **accept** its sequence
   durably (:class:`~.sequences.SequenceStore`) before anything is fetched, so neither a
   restart nor a rollback lets an older manifest in again;
2. download the payload in checked chunks, resuming after a restart (:mod:`.fetch`: retained
   chunks over the link, or HTTP Range when the manifest names a URI), decrypt it when it is
   encrypted to this gateway;
3. hand it to the :class:`ModelHost` (validate, install in the inactive slot, run in shadow);
4. promote it when the shadow gate passes, or reject it with the reason.

A newer manifest for a component cancels the work on an older one (one stuck update never
blocks the next). Every step is published retained on ``{prefix}/state/<gateway>/<component>``
(:mod:`.report`). Refused manifests (bad signature, replayed older ones, ...) are logged once
with a count and kept in ``refused`` (and the state document's ``last_refused``): they do not
change what the gateway reports about its models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..telemetry import RepeatedLog
from .download import DownloadError, Progress
from .fetch import Fetcher, HttpRangeFetcher, MqttChunkFetcher, download
from .link import OtaLink
from .manifest import COMPONENTS, Manifest, ManifestRefused, decrypt_payload, verify_envelope
from .report import ComponentState, component_topic
from .sequences import SequenceStore
from .trust import TrustAnchors

__all__ = ["ModelHost", "OtaAgent", "manifest_filters"]

log = logging.getLogger(__name__)

#: terminal states: a duplicate of a manifest that reached one is not worked on again
DONE = frozenset({"active", "rejected", "rolled-back"})


class ModelHost(Protocol):
    """Where models live and run (slots, the runtime's shadow and swap)."""

    def begin(self, component: str, model: Path, manifest: Manifest, envelope: bytes) -> None:
        """Validate ``model``, install it in the inactive slot and start its shadow run;
        raises ``CandidateRejected`` (``reason``, ``detail``)."""

    def decision(self, component: str) -> tuple[str, str, dict[str, Any]]:
        """The shadow gate now: ("pending" | "pass" | "fail", reason, shadow snapshot)."""

    def promote(self, component: str) -> None:
        """Make the shadow candidate the active model (atomically, between batches)."""

    def abandon(self, component: str, reason: str) -> None:
        """Stop the shadow run and mark the candidate rejected."""

    def active(self, component: str) -> dict[str, Any]:
        """What scores now: {"sequence", "version", "source", ...}."""

    def rolled_back(self, component: str) -> str | None:
        """Why the last start rolled ``component`` back (None when it did not)."""


def manifest_filters(prefix: str, gateway_class: str, gateway_id: str) -> list[str]:
    """The topic filters of the manifests a gateway takes."""
    return [f"{prefix}/manifest/{gateway_class}/+", f"{prefix}/manifest/gw/{gateway_id}/+"]


class OtaAgent:
    """See the module docstring. ``await run()`` until cancelled."""

    def __init__(self, *, link: OtaLink, trust: TrustAnchors, sequences: SequenceStore,
                 host: ModelHost, work_dir: Path, gateway_id: str, gateway_class: str,
                 gateway_version: str, prefix: str = "rapidmq/ota",
                 max_payload_bytes: int = 64 << 20, window: int = 4, bandwidth: float = 0.0,
                 recipient: Any = None, components: Sequence[str] = COMPONENTS,
                 poll: float = 1.0, report_every: float = 2.0,
                 fetcher: Callable[[Manifest], Fetcher] | None = None) -> None:
        self.link = link
        self.trust = trust
        self.sequences = sequences
        self.host = host
        self.work_dir = Path(work_dir)
        self.gateway_id = gateway_id
        self.gateway_class = gateway_class
        self.gateway_version = gateway_version
        self.prefix = prefix.rstrip("/")
        self.max_payload_bytes = max_payload_bytes
        self.window = window
        self.bandwidth = bandwidth
        self.recipient = recipient
        self.components = tuple(components)
        self.poll = poll
        self.report_every = report_every
        self._fetcher = fetcher or self._default_fetcher
        self.states = {c: self._load_state(c) for c in self.components}
        self.refused: dict[str, int] = {}
        self.last_refused: dict[str, Any] | None = None
        self._tasks: dict[str, tuple[bytes, asyncio.Task[None]]] = {}
        self._repeats = RepeatedLog(log)
        self._last_report: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    def _state_path(self, component: str) -> Path:
        return self.work_dir / f"state-{component}.json"

    def _load_state(self, component: str) -> ComponentState:
        st = ComponentState(component)
        with contextlib.suppress(OSError, ValueError, TypeError):
            d = json.loads(self._state_path(component).read_text())
            st = ComponentState(component, **{k: v for k, v in d.items() if k != "component"})
        return st

    def _save_state(self, st: ComponentState) -> None:
        path = self._state_path(st.component)
        tmp = path.with_suffix(".tmp")
        data = st.to_json()
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _set(self, component: str, state: str, *, force: bool = True, **changes: Any) -> None:
        """Change a component's state, keep it on disk and publish it (throttled unless
        ``force``: progress and shadow figures)."""
        st = self.states[component]
        st.set(state, active=self.host.active(component), **changes)
        now = time.monotonic()
        if not force and now - self._last_report.get(component, 0.0) < self.report_every:
            return
        self._last_report[component] = now
        self._save_state(st)
        self._publish(component)

    def _publish(self, component: str) -> None:
        st = self.states[component]
        doc = json.loads(st.to_json())
        if self.last_refused is not None:
            doc["last_refused"] = self.last_refused
        payload = json.dumps(doc, separators=(",", ":")).encode()
        task = asyncio.ensure_future(self.link.publish(
            component_topic(self.prefix, self.gateway_id, component), payload, 1, True))
        task.add_done_callback(_quiet)

    # ------------------------------------------------------------------ run
    async def run(self) -> None:
        """Subscribe, announce every component, and work on manifests as they come."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # said loudly: without the agent no update comes in
            log.exception("ota: the update agent stopped")
            raise

    async def _run(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.link.add_listener(self._on_message)
        for c in self.components:
            why = self.host.rolled_back(c)
            if why is not None:
                self._set(c, "rolled-back", reason=why)
            else:
                st = self.states[c]
                self._set(c, st.state if st.state in DONE else "idle", reason=st.reason)
        for filt in manifest_filters(self.prefix, self.gateway_class, self.gateway_id):
            await self.link.subscribe(filt, 1)
        try:
            await asyncio.Event().wait()
        finally:
            self.link.remove_listener(self._on_message)
            for _, task in self._tasks.values():
                task.cancel()
            for _, task in list(self._tasks.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        head = f"{self.prefix}/manifest/"
        if not topic.startswith(head) or not payload:
            return
        component = topic.rsplit("/", 1)[-1]
        self.take(component, payload)

    def take(self, component: str, envelope: bytes) -> None:
        """A manifest for ``component`` came: verify it and start working on it when it is
        new (or accepted before and not finished: a restart resumes it)."""
        running = self._tasks.get(component)
        if running is not None and running[0] == envelope and not running[1].done():
            return
        try:
            m = verify_envelope(envelope, self.trust, gateway_class=self.gateway_class,
                                gateway_version=self.gateway_version,
                                max_payload_bytes=self.max_payload_bytes,
                                accepted=self.sequences, components=self.components)
        except ManifestRefused as exc:
            self._refuse(component, exc)
            return
        if m.component != component:
            self._refuse(component, ManifestRefused(
                "wrong-topic", f"a {m.component} manifest on the {component} topic"))
            return
        st = self.states[m.component]
        if m.status == "duplicate" and st.sequence == m.sequence and st.state in DONE:
            return  # finished before (this start or an earlier one)
        if running is not None and not running[1].done():
            running[1].cancel()
            log.info("ota: %s sequence %d supersedes the update in progress",
                     m.component, m.sequence)
        self.sequences.accept(m.component, m.sequence, m.manifest_sha256)
        task = asyncio.ensure_future(self._work(m, envelope))
        self._tasks[m.component] = (envelope, task)

    def _refuse(self, component: str, exc: ManifestRefused) -> None:
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        self.last_refused = {"component": component, "reason": exc.reason,
                             "detail": exc.detail, "at": round(time.time(), 3)}
        level = logging.INFO if exc.reason in ("rollback", "duplicate") else logging.WARNING
        self._repeats(f"refused:{component}:{exc.reason}", level,
                      "ota: %s manifest refused (%s): %s", component, exc.reason, exc.detail)
        if component in self.states:
            self._publish(component)

    # ------------------------------------------------------------------ one update
    async def _work(self, m: Manifest, envelope: bytes) -> None:
        c = m.component
        about: dict[str, Any] = {"sequence": m.sequence, "version": m.version}
        try:
            self._set(c, "downloading", progress=0.0, shadow=None, **about)

            def progress(p: Progress) -> None:
                self._set(c, "downloading", force=False, progress=p.fraction, **about)

            def state(kind: str, reason: str) -> None:
                if kind in ("retrying", "waiting"):
                    self._repeats(f"download:{c}", logging.WARNING,
                                  "ota: %s download %s: %s", c, kind, reason)

            path = await download(m, self._fetcher(m), self.work_dir / "partial",
                                  on_progress=progress, on_state=state)
            self._repeats.clear(f"download:{c}")
            if m.encryption is not None:
                plain = decrypt_payload(m, path.read_bytes(), self.recipient)
                path.unlink()
                path = self.work_dir / "partial" / f"{m.payload_digest.hex()}.model"
                path.write_bytes(plain)
            self._set(c, "validating", progress=1.0, **about)
            try:  # off the event loop: onnxruntime opening the candidate takes ~50 ms
                await asyncio.to_thread(self.host.begin, c, path, m, envelope)
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()
            self._set(c, "shadow", **about)
            while True:
                verdict, reason, shadow = self.host.decision(c)
                if verdict == "pass":
                    self.host.promote(c)
                    self._set(c, "active", shadow=shadow, **about)
                    log.info("ota: %s %s (sequence %d) is active", c, m.version, m.sequence)
                    return
                if verdict == "fail":
                    self.host.abandon(c, reason)
                    self._set(c, "rejected", reason=f"shadow: {reason}", shadow=shadow, **about)
                    log.warning("ota: %s %s (sequence %d) rejected by the shadow gate: %s",
                                c, m.version, m.sequence, reason)
                    return
                self._set(c, "shadow", force=False, shadow=shadow, **about)
                await asyncio.sleep(self.poll)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                self.host.abandon(c, "superseded")
            raise
        except (ManifestRefused, DownloadError) as exc:
            self._set(c, "rejected", reason=str(exc), **about)
            log.warning("ota: %s sequence %d rejected: %s", c, m.sequence, exc)
        except Exception as exc:  # CandidateRejected and anything unexpected: never crash
            why = getattr(exc, "reason", None)
            detail = f"{why}: {getattr(exc, 'detail', exc)}" if why else repr(exc)
            with contextlib.suppress(Exception):
                self.host.abandon(c, detail)
            self._set(c, "rejected", reason=detail, **about)
            log.warning("ota: %s sequence %d rejected: %s", c, m.sequence, detail)

    def _default_fetcher(self, m: Manifest) -> Fetcher:
        if m.uri:
            return HttpRangeFetcher(m.uri, bandwidth=self.bandwidth)
        return MqttChunkFetcher(self.link, self.prefix, self.window, self.bandwidth)

    def metric_labels(self) -> list[dict[str, str]]:
        """One label set per component for ``rapidmq_ota_component_info`` (/metrics)."""
        out = []
        for c, st in self.states.items():
            active = st.active or {}
            out.append({"component": c, "state": st.state,
                        "sequence": "" if st.sequence is None else str(st.sequence),
                        "active_version": str(active.get("version", "")),
                        "active_source": str(active.get("source", ""))})
        return out

    def snapshot(self) -> dict[str, Any]:
        """For ``status`` and metrics: every component's state and the refusals."""
        return {"components": {c: json.loads(s.to_json()) for c, s in self.states.items()},
                "refused": dict(self.refused), "last_refused": self.last_refused,
                "link": self.link.status()}


def _quiet(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # consumed: a publish that failed is published again next change
