"""The runtime's swappable models as OTA installs see them (:class:`ModelControl`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..intelligence.models import Scorer, Shadow, ShadowSink

if TYPE_CHECKING:
    from .intelligence_runtime import IntelligenceRuntime

__all__ = ["ModelControl"]

log = logging.getLogger("rapidmq_edge.pipeline.intelligence_runtime")


class ModelControl:
    """The runtime's priority and threat scorers as OTA installs see them: attach a shadow
    candidate (it scores the same rows after the active one, never decides), promote it or
    use any scorer (an atomic swap: the batch scorer takes it between batches, the threat
    watch between ticks), drop the shadow. Call on the event loop."""

    COMPONENTS = ("priority", "threat")

    def __init__(self, runtime: IntelligenceRuntime) -> None:
        self._rt = runtime
        self.swaps = 0

    def active(self, component: str) -> Scorer:
        """The scorer deciding for ``component`` now."""
        self._holder(component)
        return self._rt.priority if component == "priority" else self._rt.threat

    def shadow(self, component: str, scorer: Scorer, evaluator: ShadowSink) -> None:
        """Run ``scorer`` in shadow beside the active ``component`` model, fed to
        ``evaluator`` (replaces a shadow already attached)."""
        holder = self._holder(component)
        active = self.active(component)
        if scorer.width != active.width or scorer.labels != active.labels:
            raise ValueError(f"{component}: candidate takes {scorer.width} features and "
                             f"answers {scorer.labels}, not {active.width} / {active.labels}")
        holder.shadow = Shadow(scorer, evaluator)
        log.info("intelligence: %s candidate %s in shadow beside %s", component,
                 scorer.version, active.version)

    def shadowing(self, component: str) -> Shadow | None:
        """The attached shadow, if any."""
        return self._holder(component).shadow

    def drop_shadow(self, component: str) -> Scorer | None:
        """Detach the shadow candidate; returns it (None if there was none)."""
        holder = self._holder(component)
        sh, holder.shadow = holder.shadow, None
        return sh.candidate if sh is not None else None

    def promote(self, component: str) -> Scorer:
        """The shadow candidate becomes the active model (detached from the shadow)."""
        sh = self._holder(component).shadow
        if sh is None:
            raise ValueError(f"{component}: no candidate in shadow")
        self.drop_shadow(component)
        self.use(component, sh.candidate)
        return sh.candidate

    def use(self, component: str, scorer: Scorer) -> Scorer:
        """Swap the active model for ``scorer`` (promotion, rollback); returns the old one."""
        holder = self._holder(component)
        old = self.active(component)
        if scorer.width != old.width or scorer.labels != old.labels:
            raise ValueError(f"{component}: {scorer.version} does not fit the contract")
        rt = self._rt
        if component == "priority":
            rt.scorer.use(scorer)
            rt.priority = scorer
        else:
            holder.scorer = scorer
            rt.threat = scorer
        self.swaps += 1
        log.info("intelligence: %s model %s -> %s", component, old.version, scorer.version)
        return old

    def shadow_status(self, component: str) -> dict[str, Any]:
        """``{"shadow": {...}}`` while a candidate is attached (for the snapshot), else {}."""
        holder = self._rt.scorer if component == "priority" else self._rt.watch
        sh = getattr(holder, "shadow", None)
        if sh is None:
            return {}
        ev = getattr(sh.sink, "snapshot", None)
        report = ev() if callable(ev) else {}
        return {"shadow": {"version": sh.candidate.version,
                           **{k: report[k] for k in ("decision", "messages", "agreement",
                                                     "exceptions") if k in report}}}

    def _holder(self, component: str) -> Any:
        if component == "priority":
            if self._rt.priority.source == "off":
                raise ValueError("priority scoring is off (no [[upstream]] or priority off)")
            return self._rt.scorer
        if component == "threat":
            if self._rt.watch is None:
                raise ValueError("the threat watch is off")
            return self._rt.watch
        raise ValueError(f"no swappable model {component!r} (one of {self.COMPONENTS})")
