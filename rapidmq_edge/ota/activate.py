"""Models from the slots into the running gateway: at start, through shadow, on promotion
and rollback.

- :func:`load_active_models` (gateway start): counts the start for the crash-loop guard
  (:meth:`~.slots.SlotStore.record_start`, which may roll back), then re-validates each
  active slot (digest, size, load, shapes, its vectors: :func:`~.validate.validate_candidate`);
  a slot failing that is rolled back (to the previous slot, else the shipped model) with the
  reason recorded. Returns the scorers the runtime uses instead of the shipped models.
- :class:`RuntimeModelHost`: the :class:`~.agent.ModelHost` the OTA agent drives: ``begin``
  validates a downloaded model, installs it in the inactive slot and attaches it in shadow
  (:class:`~.shadow.ShadowEvaluator` under the manifest's gate over the configured one);
  ``decision`` reads the gate; ``promote`` makes it active on disk then in the runtime (an
  atomic swap between batches); ``abandon`` rejects it; ``rollback`` and ``sync`` (after
  ``rapidmq-edge model rollback`` changed the disk) swap the runtime to what the slots say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from ..intelligence.models import Scorer, load_scorer
from .shadow import ShadowEvaluator, ShadowGate
from .slots import MAX_STARTS, WINDOW_S, ModelInfo, SlotError, SlotStore
from .validate import CandidateRejected, ValidatedModel, validate_candidate

__all__ = ["HEALTHY_AFTER_S", "ActiveModels", "RuntimeModelHost", "gate_from_settings",
           "load_active_models", "validate_slot"]

log = logging.getLogger(__name__)

#: seconds a gateway must run after a start before its promoted models count as healthy
HEALTHY_AFTER_S = 60.0
#: how often the running gateway looks at the slots on disk (``model rollback`` while running)
FOLLOW_S = 2.0


def validate_slot(slots: SlotStore, component: str, slot: str) -> ValidatedModel:
    """The slot's model checked again as at install (its own info: digest, size, vectors)."""
    info = slots.info(component, slot)
    return validate_candidate(component, slots.model_path(component, slot), info.digest,
                              info.size, info.inputs, info.outputs, info.vectors,
                              version=info.version)


@dataclass
class ActiveModels:
    """What :func:`load_active_models` found: validated scorers per component (absent: the
    shipped model), the slot each came from, and the rollbacks this start made."""

    slots: SlotStore
    scorers: dict[str, Scorer] = field(default_factory=dict)
    loaded: dict[str, str] = field(default_factory=dict)
    rolled_back: dict[str, str] = field(default_factory=dict)

    def host(self, models: Any, models_dir: Path, gate: ShadowGate | None = None
             ) -> RuntimeModelHost:
        """The model host over these slots and the runtime's ``models`` control."""
        return RuntimeModelHost(self.slots, models, models_dir, gate, self)

    async def run(self, host: RuntimeModelHost | None = None,
                  healthy_after: float = HEALTHY_AFTER_S, every: float = FOLLOW_S) -> None:
        """Mark promoted models healthy once the gateway has run ``healthy_after`` seconds;
        every ``every`` seconds let ``host`` follow the slots on disk (a ``rapidmq-edge model
        rollback`` while running takes effect here)."""
        loop = asyncio.get_running_loop()
        healthy_at = loop.time() + healthy_after
        while True:
            await asyncio.sleep(min(every, max(0.0, healthy_at - loop.time())) or every)
            if healthy_at and loop.time() >= healthy_at:
                healthy_at = 0.0
                try:
                    done = self.slots.mark_healthy()
                except (OSError, SlotError) as exc:
                    log.error("ota: cannot mark the models healthy: %s", exc)
                    done = []
                if done:
                    log.info("ota: %s healthy after %.0f s", ", ".join(done), healthy_after)
            if host is not None:
                try:
                    host.sync()
                except Exception:  # following the disk must not stop
                    log.exception("ota: following the slots failed")


def load_active_models(data_dir: Path, components: Iterable[str] = ("priority", "threat"),
                       max_starts: int = MAX_STARTS, window_s: float = WINDOW_S,
                       clock: Callable[[], float] = time.time) -> ActiveModels:
    """Count this start, roll back crash loops and slots that fail validation; the
    validated active slot of each of ``components`` (module docstring)."""
    slots = SlotStore(data_dir, clock)
    out = ActiveModels(slots)
    try:
        out.rolled_back.update(slots.record_start(max_starts, window_s))
    except (OSError, SlotError) as exc:
        log.error("ota: crash-loop guard not counted: %s", exc)
    for component in components:
        for _ in range(3):  # active -> previous -> shipped at most
            try:
                st = slots.state(component)
            except SlotError as exc:
                log.error("ota: %s: %s; the shipped model is used", component, exc)
                break
            if st.active is None:
                break
            try:
                vm = validate_slot(slots, component, st.active)
            except (CandidateRejected, SlotError) as exc:
                reason = f"slot {st.active} failed validation at start: {exc}"
                out.rolled_back[component] = reason
                slots.rollback(component, reason)
                continue
            out.scorers[component] = vm.scorer
            out.loaded[component] = st.active
            log.info("ota: %s model %s from slot %s", component, vm.scorer.version, st.active)
            break
    return out


def _gate_values(gate: Any) -> dict[str, Any]:
    """A manifest's gate (dataclass or mapping) as its set thresholds (None: not set)."""
    if gate is None:
        return {}
    values = asdict(gate) if is_dataclass(gate) and not isinstance(gate, type) else dict(gate)
    return {k: v for k, v in values.items() if v is not None}


def _plain(manifest: Any) -> tuple[str, int]:
    """SHA-256 (hex) and size of the model itself (the decrypted one when encrypted)."""
    enc = getattr(manifest, "encryption", None)
    if enc is not None:
        return enc.plain_digest.hex(), int(enc.plain_size)
    return manifest.payload_digest.hex(), int(manifest.payload_size)


def _specs(specs: Any) -> list[Any] | None:
    if specs is None:
        return None
    return [asdict(s) if is_dataclass(s) and not isinstance(s, type) else s for s in specs]


def _vectors(vectors: Any) -> list[Any]:
    """A manifest's vectors (``inputs`` rows and ``labels``) as (row, label) pairs."""
    if vectors is None:
        return []
    if hasattr(vectors, "inputs") and hasattr(vectors, "labels"):
        return [[list(r), int(lab)] for r, lab in zip(vectors.inputs, vectors.labels,
                                                       strict=True)]
    return list(vectors)


class RuntimeModelHost:
    """The OTA agent's model host over the slots and the runtime's
    :class:`~rapidmq_edge.pipeline.model_control.ModelControl` (``models``).

    ``gate``: the configured shadow thresholds (a manifest's gate overrides the ones it
    sets); ``models_dir``: the shipped models (the rollback target of last resort);
    ``started``: what :func:`load_active_models` did at this start."""

    def __init__(self, slots: SlotStore, models: Any, models_dir: Path,
                 gate: ShadowGate | None = None, started: ActiveModels | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.models = models
        self.models_dir = models_dir
        self.gate = gate or ShadowGate()
        self.clock = clock
        self.evaluators: dict[str, ShadowEvaluator] = {}
        self._rolled = dict(started.rolled_back) if started is not None else {}
        #: component -> slot whose model the runtime uses (absent: the shipped one)
        self.loaded: dict[str, str] = dict(started.loaded) if started is not None else {}

    # -- the agent's ModelHost -----------------------------------------------------

    def begin(self, component: str, model: Path, manifest: Any, envelope: bytes) -> None:
        """Validate ``model`` against ``manifest``, install it in the inactive slot, start
        its shadow run. CandidateRejected (reason, detail) when it fails."""
        digest, size = _plain(manifest)
        vectors = _vectors(getattr(manifest, "vectors", None))
        inputs, outputs = _specs(manifest.inputs), _specs(manifest.outputs)
        gate = _gate_values(getattr(manifest, "gate", None))
        try:
            shadow_gate = ShadowGate.from_mapping(gate, self.gate)
        except ValueError as exc:
            raise CandidateRejected("gate", str(exc)) from None
        vm = validate_candidate(component, model, digest, size, inputs, outputs, vectors,
                                version=manifest.version)
        info = ModelInfo(manifest.sequence, manifest.version, digest, size, vectors,
                         inputs, outputs, gate or None)
        try:
            slot = self.slots.install(component, model, info, envelope)
        except (OSError, SlotError) as exc:
            raise CandidateRejected("install", str(exc)) from None
        scorer = replace(vm.scorer, path=self.slots.model_path(component, slot))
        ev = ShadowEvaluator(component, shadow_gate, self.clock)
        try:
            self.models.shadow(component, scorer, ev)
        except ValueError as exc:
            self.slots.set_state(component, "rejected", f"shadow: {exc}")
            raise CandidateRejected("shadow", str(exc)) from None
        self.evaluators[component] = ev
        self.slots.set_state(component, "shadow")

    def decision(self, component: str) -> tuple[str, str, dict[str, Any]]:
        """("pending" | "pass" | "fail", reason, the shadow's figures)."""
        ev = self.evaluators.get(component)
        if ev is None:
            return "fail", "no shadow run", {}
        d = ev.decision()
        return d.state, (f"{d.reason}: {d.detail}" if d.reason else d.detail), ev.snapshot()

    def promote(self, component: str) -> None:
        """The candidate becomes active: durably in the slots first, then in the runtime."""
        slot = self.slots.promote(component)
        self.models.promote(component)
        self.loaded[component] = slot
        self.evaluators.pop(component, None)

    def abandon(self, component: str, reason: str) -> None:
        """Stop the shadow run; the candidate is recorded as rejected with ``reason``."""
        self.models.drop_shadow(component)
        self.evaluators.pop(component, None)
        with contextlib.suppress(SlotError):  # nothing installed (rejected before install)
            self.slots.set_state(component, "rejected", reason)

    def active(self, component: str) -> dict[str, Any]:
        """What scores now: source (ota / shipped / rules / off), slot, sequence, version."""
        sc = self.models.active(component)
        slot = self.loaded.get(component)
        out: dict[str, Any] = {"source": "ota" if slot else sc.source, "version": sc.version,
                               "slot": slot}
        if slot:
            with contextlib.suppress(SlotError):
                out["sequence"] = self.slots.info(component, slot).sequence
        return out

    def rolled_back(self, component: str) -> str | None:
        """Why this start (or a later rollback) rolled ``component`` back, if it did."""
        return self._rolled.get(component)

    # -- rollback and following the disk -------------------------------------------

    def rollback(self, component: str, reason: str) -> str | None:
        """Roll back on disk and swap the runtime to the model now active there."""
        slot = self.slots.rollback(component, reason)
        self._rolled[component] = reason
        self._use_disk(component)
        return slot

    def sync(self) -> list[str]:
        """Swap the runtime to each component's active slot on disk where it differs (e.g.
        ``rapidmq-edge model rollback`` while running). Returns the components swapped."""
        out = []
        for component in self.models.COMPONENTS:
            try:
                st = self.slots.state(component)
                self.models.active(component)
            except (SlotError, ValueError):
                continue
            if st.active != self.loaded.get(component):
                if st.state == "rolled-back":
                    self._rolled[component] = st.reason
                self._use_disk(component)
                out.append(component)
        return out

    def _use_disk(self, component: str) -> None:
        """The runtime scores with the slot active on disk (or the shipped model)."""
        for _ in range(3):
            st = self.slots.state(component)
            if st.active is None:
                self.models.use(component, load_scorer(self.models_dir, component, "model"))
                self.loaded.pop(component, None)
                return
            try:
                vm = validate_slot(self.slots, component, st.active)
            except (CandidateRejected, SlotError) as exc:
                self.slots.rollback(component, f"slot {st.active} failed validation: {exc}")
                continue
            self.models.use(component, vm.scorer)
            self.loaded[component] = st.active
            return


def gate_from_settings(settings: Any) -> ShadowGate:
    """The configured gate from ``[ota]`` (``shadow_min_*``), where set."""
    values: Mapping[str, Any] = {
        k: getattr(settings, f"shadow_{k}") for k in
        (f.name for f in fields(ShadowGate)) if hasattr(settings, f"shadow_{k}")}
    return ShadowGate.from_mapping(values)
