"""Shadow evaluation of a candidate model beside the active one (sans-I/O).

The runtime scores every batch with the active model (which decides) and then the same
feature rows with the candidate (which does not), and feeds both answers here. The
evaluator keeps what the gate judges:

- **agreement**: share of messages whose candidate label equals the active label;
- **shift**: population stability index (PSI) of the candidate's confidences against the
  active's, over ``bins`` equal bins of [0, 1] (0 = same distribution; > 0.25 is the usual
  "significant shift"); the Kolmogorov-Smirnov distance of the binned distributions is
  reported beside it;
- **cost**: µs per scored row of the candidate and of the active model, measured on the
  same rows in the scoring thread's CPU time (another process taking the core does not
  make one of them look slower);
- **exceptions**: candidate runs that raised (each counts against it; the message path
  never sees them).

:meth:`ShadowEvaluator.decision` is ``pending`` until ``min_messages`` messages and
``min_seconds`` (injected clock) are reached, then ``pass`` or ``fail`` with the first
threshold missed; too many exceptions fail at once. A final decision stays final.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = ["Decision", "ShadowEvaluator", "ShadowGate"]

#: decision states
PENDING, PASS, FAIL = "pending", "pass", "fail"
#: a bin's share is floored at this in the PSI (an empty bin would make it infinite)
PSI_FLOOR = 1e-4
#: batches up to this many messages are accumulated in plain Python
SMALL_BATCH = 48


def _as_list(values: Sequence[Any] | np.ndarray) -> list[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


@dataclass(frozen=True)
class ShadowGate:
    """What a candidate must show in shadow before it may be promoted.

    ``None`` for ``max_shift``, ``max_cost_ratio`` or ``max_cost_us`` switches that check
    off; ``max_cost_ratio`` compares µs per row with the active model on the same rows
    (skipped while the active costs nothing measurable, e.g. the rules).
    """

    min_messages: int = 1000
    min_seconds: float = 60.0
    min_agreement: float = 0.98
    max_shift: float | None = 0.25
    max_cost_ratio: float | None = 3.0
    max_cost_us: float | None = None
    max_exceptions: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None,
                     base: ShadowGate | None = None) -> ShadowGate:
        """``base`` (default: the defaults) with the keys of ``values`` (a manifest's or the
        config's gate) replaced; an unknown key or a bad value raises ValueError naming it."""
        out = base or cls()
        if not values:
            return out
        known = {f.name: f for f in fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"shadow gate: unknown key {key!r}")
            if value is None and key.startswith("max_") and key != "max_exceptions":
                changes[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0:
                raise ValueError(f"shadow gate: {key} must be a number >= 0, not {value!r}")
            if key in ("min_messages", "max_exceptions"):
                if value != int(value):
                    raise ValueError(f"shadow gate: {key} must be an integer, not {value!r}")
                value = int(value)
            if key == "min_agreement" and value > 1:
                raise ValueError(f"shadow gate: min_agreement must be at most 1, not {value!r}")
            changes[key] = float(value) if isinstance(value, float) else value
        return cls(**{**{f: getattr(out, f) for f in known}, **changes})


@dataclass(frozen=True)
class Decision:
    """``state``: pending / pass / fail; ``reason`` names the failed check (agreement,
    shift, cost, exceptions), ``detail`` says by how much."""

    state: str
    reason: str = ""
    detail: str = ""


class ShadowEvaluator:
    """Accumulates the active and candidate answers on the same rows; judges the gate."""

    def __init__(self, component: str, gate: ShadowGate | None = None,
                 clock: Callable[[], float] = time.monotonic, bins: int = 10) -> None:
        self.component = component
        self.gate = gate or ShadowGate()
        self.clock = clock
        self.started = clock()
        self.bins = bins
        self.messages = 0  # messages seen (with or without a candidate answer)
        self.compared = 0  # messages with both answers
        self.agreed = 0
        self.exceptions = 0
        self.last_exception = ""
        self.rows_run = 0  # rows the candidate actually ran on (not answered from a cache)
        self.cand_seconds = 0.0
        self.active_rows = 0
        self.active_seconds = 0.0
        self.hist_active = np.zeros(bins, np.int64)
        self.hist_cand = np.zeros(bins, np.int64)
        self.labels_active: dict[int, int] = {}
        self.labels_cand: dict[int, int] = {}
        self._final: Decision | None = None

    # -- feeding -------------------------------------------------------------------

    def feed(self, active_labels: Sequence[int] | np.ndarray,
             active_conf: Sequence[float] | np.ndarray,
             cand_labels: Sequence[int] | np.ndarray | None,
             cand_conf: Sequence[float] | np.ndarray | None, *,
             cand_seconds: float = 0.0, active_seconds: float = 0.0,
             rows_run: int | None = None, exceptions: int = 0,
             error: str = "") -> None:
        """One batch: per message, the active label and confidence and the candidate's
        (None when the candidate raised: ``exceptions`` > 0, ``error`` says what).
        ``rows_run``: rows both models actually ran on in ``*_seconds`` (default: every
        message; less when answers came from a per-key cache)."""
        n = len(active_labels)
        if len(active_conf) != n:
            raise ValueError(f"shadow feed: {n} active labels but {len(active_conf)} "
                             "confidences")
        run = n if rows_run is None else rows_run
        self.messages += n
        self.exceptions += exceptions
        if error:
            self.last_exception = error[:200]
        if active_seconds > 0:
            self.active_seconds += active_seconds
            self.active_rows += run
        if cand_labels is None or cand_conf is None:
            self.cand_seconds += cand_seconds
            return
        if len(cand_labels) != n or len(cand_conf) != n:
            raise ValueError(f"shadow feed: {n} active answers but {len(cand_labels)} "
                             f"candidate labels and {len(cand_conf)} confidences")
        self.cand_seconds += cand_seconds
        self.rows_run += run
        self.compared += n
        if n <= SMALL_BATCH:  # a few messages: plain Python costs less than numpy's calls
            self._feed_small(_as_list(active_labels), _as_list(active_conf),
                             _as_list(cand_labels), _as_list(cand_conf))
            return
        a_lab = np.asarray(active_labels, dtype=np.int64)
        c_lab = np.asarray(cand_labels, dtype=np.int64)
        self.agreed += int(np.count_nonzero(a_lab == c_lab))
        self.hist_active += self._hist(np.asarray(active_conf, dtype=np.float64))
        self.hist_cand += self._hist(np.asarray(cand_conf, dtype=np.float64))
        for counts, labels in ((self.labels_active, a_lab), (self.labels_cand, c_lab)):
            if len(labels) and int(labels.min()) >= 0:  # class indices: one bincount
                for v, k in enumerate(np.bincount(labels).tolist()):
                    if k:
                        counts[v] = counts.get(v, 0) + k
                continue
            values, times = np.unique(labels, return_counts=True)
            for v, k in zip(values.tolist(), times.tolist(), strict=True):
                counts[v] = counts.get(v, 0) + k

    def _feed_small(self, a_lab: list[Any], a_conf: list[Any], c_lab: list[Any],
                    c_conf: list[Any]) -> None:
        bins = self.bins
        top = bins - 1
        self.agreed += sum(1 for a, c in zip(a_lab, c_lab, strict=True) if a == c)
        for hist, confs in ((self.hist_active, a_conf), (self.hist_cand, c_conf)):
            for x in confs:
                i = int(x * bins) if x == x else 0  # NaN -> bin 0
                hist[0 if i < 0 else top if i > top else i] += 1
        for counts, labels in ((self.labels_active, a_lab), (self.labels_cand, c_lab)):
            for v in labels:
                counts[v] = counts.get(v, 0) + 1

    def _hist(self, conf: np.ndarray) -> np.ndarray:
        x = conf * self.bins
        x[~(x >= 0)] = 0  # negative and NaN -> the first bin
        return np.bincount(np.minimum(x, self.bins - 1).astype(np.int64), minlength=self.bins)

    # -- measures ------------------------------------------------------------------

    @property
    def agreement(self) -> float:
        """Share of compared messages with equal labels (1.0 before any)."""
        return self.agreed / self.compared if self.compared else 1.0

    @property
    def shift(self) -> float:
        """PSI of the candidate's confidence distribution against the active's."""
        a, c = self._shares()
        if a is None or c is None:
            return 0.0
        return float(np.sum((c - a) * np.log(c / a)))

    @property
    def ks(self) -> float:
        """Largest distance of the two binned cumulative confidence distributions."""
        a, c = self._shares()
        if a is None or c is None:
            return 0.0
        return float(np.max(np.abs(np.cumsum(a) - np.cumsum(c))))

    def _shares(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        ta, tc = int(self.hist_active.sum()), int(self.hist_cand.sum())
        if not ta or not tc:
            return None, None
        return (np.maximum(self.hist_active / ta, PSI_FLOOR),
                np.maximum(self.hist_cand / tc, PSI_FLOOR))

    @property
    def cost_us(self) -> float:
        """The candidate's µs per scored row."""
        return self.cand_seconds / self.rows_run * 1e6 if self.rows_run else 0.0

    @property
    def active_cost_us(self) -> float:
        """The active model's µs per row on the same rows (0 when not measured)."""
        return self.active_seconds / self.active_rows * 1e6 if self.active_rows else 0.0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    # -- the gate ------------------------------------------------------------------

    def decision(self) -> Decision:
        """pending, pass, or fail(reason); a pass or fail is final."""
        if self._final is not None:
            return self._final
        g = self.gate
        if self.exceptions > g.max_exceptions:
            return self._decide(FAIL, "exceptions",
                                f"{self.exceptions} candidate exception(s) > "
                                f"{g.max_exceptions}: {self.last_exception}")
        if self.messages < g.min_messages or self.elapsed < g.min_seconds:
            return Decision(PENDING, "", f"{self.messages}/{g.min_messages} messages, "
                                         f"{self.elapsed:.0f}/{g.min_seconds:g} s")
        if not self.compared:
            return self._decide(FAIL, "agreement", "no message compared")
        if self.agreement < g.min_agreement:
            return self._decide(FAIL, "agreement", f"agreement {self.agreement:.4f} < "
                                                   f"{g.min_agreement:g} over {self.compared}")
        if g.max_shift is not None and self.shift > g.max_shift:
            return self._decide(FAIL, "shift", f"confidence PSI {self.shift:.3f} > "
                                               f"{g.max_shift:g}")
        cost, ref = self.cost_us, self.active_cost_us
        if g.max_cost_us is not None and cost > g.max_cost_us:
            return self._decide(FAIL, "cost", f"{cost:.1f} us per row > {g.max_cost_us:g}")
        if g.max_cost_ratio is not None and ref > 0 and cost > g.max_cost_ratio * ref:
            return self._decide(FAIL, "cost", f"{cost:.1f} us per row > {g.max_cost_ratio:g}"
                                              f" x the active model's {ref:.1f}")
        return self._decide(PASS, "", f"agreement {self.agreement:.4f} over {self.compared}"
                                      f", PSI {self.shift:.3f}, {cost:.1f} vs {ref:.1f} us")

    def _decide(self, state: str, reason: str, detail: str) -> Decision:
        self._final = Decision(state, reason, detail)
        return self._final

    def snapshot(self) -> dict[str, Any]:
        """What status and the OTA state report show."""
        d = self.decision()
        return {
            "component": self.component,
            "decision": d.state, "reason": d.reason, "detail": d.detail,
            "messages": self.messages, "compared": self.compared,
            "agreement": round(self.agreement, 5),
            "shift_psi": round(self.shift, 4), "shift_ks": round(self.ks, 4),
            "cost_us": round(self.cost_us, 2), "active_cost_us": round(self.active_cost_us, 2),
            "exceptions": self.exceptions,
            "seconds": round(self.elapsed, 1),
            "labels_active": dict(sorted(self.labels_active.items())),
            "labels_candidate": dict(sorted(self.labels_cand.items())),
        }
