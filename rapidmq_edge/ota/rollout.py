"""A staged rollout, sans I/O: which gateways get a manifest next, and when to stop.

The operator's ``ota rollout`` drives a :class:`Rollout` with the fleet's state reports
(``{prefix}/state/<gateway>/<component>``, see :mod:`.report`) and publishes what
:meth:`Rollout.step` asks for. Stages are gateway counts or fractions of the fleet
(default 1 gateway, 10 %, 50 %, 100 %). A stage is done when each of its gateways reports
the rollout's sequence ``active`` (success) or ``rejected`` / ``rolled-back`` (failure), or
its timeout passes (silent gateways count as failures). The rollout halts for good when the
failures of all stages so far exceed ``max_failure`` of the gateways targeted (hawkBit's
error threshold, with the next group *not* started). The last stage publishes to the class
topic, so a gateway that joins later gets the update too. The state is a small dict
(:meth:`to_dict`) the caller persists, so a rollout resumes after the operator's process dies;
a halted or stuck rollout never blocks a later one (a higher sequence simply starts its own).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_STAGES", "GatewayReport", "Rollout", "Step", "parse_stages", "stage_size"]

#: 1 gateway, then 10 %, 50 % and all of the fleet
DEFAULT_STAGES: tuple[str, ...] = ("1", "10%", "50%", "100%")

SUCCESS = frozenset({"active"})
FAILURE = frozenset({"rejected", "rolled-back"})


def stage_size(stage: str, fleet: int) -> int:
    """How many gateways of a ``fleet`` a stage covers in total: ``"3"`` = 3 gateways,
    ``"10%"`` = a tenth of the fleet (at least one)."""
    if stage.endswith("%"):
        return min(fleet, max(1, math.ceil(float(stage[:-1]) / 100.0 * fleet)))
    return min(fleet, int(stage))


def parse_stages(text: str) -> tuple[str, ...]:
    """``"1,10%,50%,100%"`` checked: whole numbers are gateway counts, percentages parts
    of the fleet, growing; the last stage must be ``100%``."""
    out = tuple(p.strip() for p in text.split(","))
    for part in out:
        try:
            ok = 0.0 < float(part[:-1]) <= 100.0 if part.endswith("%") else int(part) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"stage {part!r}: a gateway count (>= 1) or a percentage (0, 100]")
    if out[-1] != "100%":
        raise ValueError("the last stage must be 100%")
    return out


@dataclass(frozen=True, slots=True)
class GatewayReport:
    """What one gateway last said about the rollout's component."""

    gateway: str
    state: str
    sequence: int | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """What the driver does now: publish to ``targets`` (gateway ids) or, with ``to_class``,
    to the class topic; ``done``/``halted`` end the rollout (``reason`` says why)."""

    targets: tuple[str, ...] = ()
    to_class: bool = False
    done: bool = False
    halted: bool = False
    reason: str = ""


@dataclass
class Rollout:
    """One component at one sequence rolled out in stages (see the module docstring)."""

    component: str
    sequence: int
    stages: tuple[str, ...] = DEFAULT_STAGES
    max_failure: float = 0.2
    stage_timeout: float = 600.0
    #: the index of the stage in progress (len(stages) once done)
    stage: int = 0
    started_at: float | None = None  # of the current stage
    targeted: list[str] = field(default_factory=list)  # every gateway published to so far
    succeeded: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # gateway -> reason
    halted: str | None = None
    published_class: bool = False

    def observe(self, reports: Iterable[GatewayReport]) -> None:
        """Take the gateways' latest reports (only those about this sequence count)."""
        for r in reports:
            if r.gateway not in self.targeted or r.sequence != self.sequence:
                continue
            if r.state in SUCCESS:
                self.succeeded.add(r.gateway)
                self.failed.pop(r.gateway, None)
            elif r.state in FAILURE:
                self.failed[r.gateway] = f"{r.state}: {r.reason or '?'}"
                self.succeeded.discard(r.gateway)

    def step(self, fleet: Sequence[str], now: float) -> Step:
        """The next thing to do for the ``fleet`` (gateway ids of the class) at ``now``."""
        if self.halted:
            return Step(halted=True, reason=self.halted)
        if self.stage >= len(self.stages):
            return Step(done=True, reason="every stage done")
        if self.started_at is None:  # start the current stage
            want = stage_size(self.stages[self.stage], len(fleet))
            new = [g for g in sorted(fleet) if g not in self.targeted][: want - len(self.targeted)]
            self.targeted += new
            self.started_at = now
            last = self.stage == len(self.stages) - 1
            self.published_class = self.published_class or last
            return Step(targets=tuple(new), to_class=last)
        pending = [g for g in self.targeted if g not in self.succeeded and g not in self.failed]
        timed_out = now - self.started_at >= self.stage_timeout
        if pending and not timed_out:
            return Step()
        failures = len(self.failed) + (len(pending) if timed_out else 0)
        if self.targeted and failures / len(self.targeted) > self.max_failure:
            silent = f", {len(pending)} silent" if timed_out and pending else ""
            self.halted = (f"stage {self.stage + 1}: {failures} of {len(self.targeted)} "
                           f"gateways failed{silent} (threshold {self.max_failure:.0%})")
            return Step(halted=True, reason=self.halted)
        self.stage += 1
        self.started_at = None
        if self.stage >= len(self.stages):
            return Step(done=True, reason="every stage done")
        return self.step(fleet, now)

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (for resuming)."""
        return {"component": self.component, "sequence": self.sequence,
                "stages": list(self.stages), "max_failure": self.max_failure,
                "stage_timeout": self.stage_timeout, "stage": self.stage,
                "started_at": self.started_at, "targeted": list(self.targeted),
                "succeeded": sorted(self.succeeded), "failed": dict(self.failed),
                "halted": self.halted, "published_class": self.published_class}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rollout:
        """The rollout :meth:`to_dict` saved."""
        return cls(component=str(d["component"]), sequence=int(d["sequence"]),
                   stages=tuple(str(s) for s in d["stages"]),
                   max_failure=float(d["max_failure"]), stage_timeout=float(d["stage_timeout"]),
                   stage=int(d["stage"]), started_at=d.get("started_at"),
                   targeted=list(d["targeted"]), succeeded=set(d["succeeded"]),
                   failed=dict(d["failed"]), halted=d.get("halted"),
                   published_class=bool(d.get("published_class")))
