"""The feedback loop's gateway side, sans I/O: sampled scored rows, incidents, the wire format.

* :class:`FeedbackSampler` takes a bounded, rate-limited sample of the rows the active
  priority model scored: at most ``rows_per_minute`` in each minute, every message with the
  same chance (``rows_per_minute`` over the message rate of the last 10 s: uniform over
  messages, not over batches), into a buffer of ``buffer`` rows that drops its oldest
  (counted) when the uploader cannot keep up. A row is (time, model version, topic, label,
  confidence, feature row); features and confidence are computed for the sampled rows only.
* :class:`IncidentBook` remembers the incidents the runtime announced (bounded), so an
  operator's verdict names a real one and carries its stream and times upstream.
* :class:`FeedbackTap` is what the runtime holds (``IntelligenceRuntime.feedback``).
* :func:`encode_rows` / :func:`encode_verdicts` / :func:`decode_feedback`: compact JSON
  batches on ``{prefix}/feedback/{gateway_id}/{component}`` (rows) and
  ``{prefix}/feedback/{gateway_id}/incidents`` (verdicts), checked strictly on decode
  (:class:`FeedbackError` names the reason).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..intelligence.features import message_features
from ..intelligence.models import CONTRACTS, Scorer

__all__ = ["FORMAT", "INCIDENTS", "FeedbackBatch", "FeedbackError", "FeedbackRow",
           "FeedbackSampler", "FeedbackTap", "IncidentBook", "decode_feedback",
           "encode_rows", "encode_verdicts", "feedback_topic"]

#: the format version in every batch
FORMAT = 1
#: the component name of the verdicts' topic
INCIDENTS = "incidents"
VERDICTS = ("confirmed", "dismissed")
#: the message rate is measured over windows of this many seconds
RATE_WINDOW = 10.0


class FeedbackError(ValueError):
    """A feedback batch that does not parse; ``reason`` is a stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def feedback_topic(prefix: str, gateway_id: str, component: str) -> str:
    """``{prefix}/feedback/{gateway_id}/{component}``."""
    return f"{prefix.rstrip('/')}/feedback/{gateway_id}/{component}"


@dataclass(frozen=True, slots=True)
class FeedbackRow:
    """One scored row: ``at`` wall-clock seconds, the model that scored it, its answer."""

    at: float
    model: str
    topic: str
    label: int
    confidence: float
    features: tuple[float, ...]


class FeedbackSampler:
    """See the module docstring. Call :meth:`offer` and :meth:`take` from one thread."""

    def __init__(self, component: str = "priority", rows_per_minute: int = 60,
                 buffer: int = 1000, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        if component not in CONTRACTS:
            raise ValueError(f"no model contract {component!r}")
        if rows_per_minute < 1 or buffer < 1:
            raise ValueError("rows_per_minute and buffer must be at least 1")
        self.component = component
        self.per_minute = rows_per_minute
        self.rate = rows_per_minute / 60.0
        self.buffer_size = buffer
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.rows: deque[FeedbackRow] = deque()
        now = clock()
        self._window = (now, 0)  # (start, messages since): the message rate
        self._minute = (now, 0)  # (start, rows taken since): the bound
        self._msg_rate = 0.0  # messages/s over the last full window
        #: counters
        self.offered = 0
        self.sampled = 0
        self.dropped = 0

    def offer(self, batch: Sequence[tuple[Any, Any, float]], labels: Sequence[int],
              scorer: Scorer) -> int:
        """A scored batch: ``batch`` (message, targets, arrival) and the priority label of
        each (-1: not scored); returns the rows taken."""
        n = len(labels)
        self.offered += n
        now = self.clock()
        start, seen = self._window
        seen += n
        if now - start >= RATE_WINDOW:
            self._msg_rate = seen / (now - start)
            start, seen = now, 0
        self._window = (start, seen)
        if now - self._minute[0] >= 60.0:
            self._minute = (now, 0)
        taken = self._minute[1]
        if taken >= self.per_minute or not n:
            return 0
        msg_rate = self._msg_rate
        if not msg_rate:  # the first window: its rate so far, after a second
            if now - start < 1.0:
                return 0
            msg_rate = seen / (now - start)
        # every message the same chance: the row rate over the message rate
        expected = n * min(1.0, self.rate / msg_rate)
        k = int(expected)
        if self.rng.random() < expected - k:
            k += 1
        k = min(k, self.per_minute - taken, n)
        if k == 0:
            return 0
        pick = [i for i in self.rng.sample(range(n), k) if labels[i] >= 0]
        if not pick:
            return 0
        self._minute = (self._minute[0], taken + len(pick))
        msgs = [batch[i][0] for i in pick]
        X = message_features([m.topic for m in msgs], [m.payload for m in msgs],
                             [m.qos for m in msgs], [m.retain for m in msgs])
        try:
            lab, conf = scorer.predict(X)
        except Exception:  # the active model failed here: keep the label it gave
            lab = [labels[i] for i in pick]  # type: ignore[assignment]
            conf = [math.nan] * len(pick)  # type: ignore[assignment]
        at = self.wall()
        version = scorer.version
        for j, m in enumerate(msgs):
            self._keep(FeedbackRow(at, version, m.topic, int(lab[j]), float(conf[j]),
                                   tuple(X[j].tolist())))
        self.sampled += len(pick)
        return len(pick)

    def _keep(self, row: FeedbackRow) -> None:
        if len(self.rows) >= self.buffer_size:
            self.rows.popleft()
            self.dropped += 1
        self.rows.append(row)

    def take(self, limit: int) -> list[FeedbackRow]:
        """Up to ``limit`` of the oldest buffered rows (removed)."""
        out: list[FeedbackRow] = []
        while self.rows and len(out) < limit:
            out.append(self.rows.popleft())
        return out

    def put_back(self, rows: Sequence[FeedbackRow]) -> None:
        """Rows an upload could not send, back in front (the bound still holds: the oldest
        are dropped and counted)."""
        room = self.buffer_size - len(self.rows)
        keep = list(rows)[-room:] if room > 0 else []
        self.dropped += len(rows) - len(keep)
        self.rows.extendleft(reversed(keep))

    def status(self) -> dict[str, Any]:
        """Counters for ``status``."""
        return {"offered": self.offered, "sampled": self.sampled, "dropped": self.dropped,
                "buffered": len(self.rows), "rows_per_minute": round(self.rate * 60)}


@dataclass(slots=True)
class IncidentBook:
    """The incidents announced lately (at most ``limit``; oldest forgotten first), from
    the runtime's alert payloads; ``unsaved`` are those not handed to a store yet."""

    limit: int = 10_000
    known: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    unsaved: dict[str, dict[str, Any]] = field(default_factory=dict)

    def incident(self, payload: dict[str, Any]) -> None:
        """An alert's payload (``state`` open / closed, ``incident``, ``stream``, ...)."""
        iid = payload.get("incident")
        if not isinstance(iid, str):
            return
        doc = self.known.get(iid)
        if doc is None:
            doc = {"incident": iid, "stream": payload.get("stream"),
                   "kind": payload.get("kind"), "opened_at": payload.get("at"),
                   "closed_at": None}
            if len(self.known) >= self.limit:
                self.known.popitem(last=False)
        if payload.get("state") == "closed":
            doc["closed_at"] = payload.get("at")
            doc["readings"] = payload.get("readings")
            at, took = payload.get("at"), payload.get("duration_s") or 0.0
            if doc["opened_at"] is None and isinstance(at, int | float):
                doc["opened_at"] = round(at - float(took), 3)
        self.known[iid] = doc
        self.unsaved[iid] = doc

    def get(self, incident: str) -> dict[str, Any] | None:
        """What is known of ``incident`` here (None: not announced lately)."""
        return self.known.get(incident)

    def drain(self) -> list[dict[str, Any]]:
        """The incidents changed since the last drain."""
        out, self.unsaved = list(self.unsaved.values()), {}
        return out


class FeedbackTap:
    """The runtime's feedback hook: scored batches to the sampler (when sampling is on),
    announced incidents to the book."""

    def __init__(self, sampler: FeedbackSampler | None, book: IncidentBook) -> None:
        self.sampler = sampler
        self.book = book

    def offer(self, batch: Sequence[tuple[Any, Any, float]], labels: Sequence[int],
              scorer: Scorer) -> None:
        """After a batch was handed on (never raises into the path)."""
        s = self.sampler
        if s is None:
            return
        try:
            s.offer(batch, labels, scorer)
        except Exception:  # a sampling bug never reaches the message path
            s.dropped += 1

    def incident(self, payload: dict[str, Any]) -> None:
        """An alert the runtime announced."""
        self.book.incident(payload)


# -- the wire format ----------------------------------------------------------------------

def _short(v: float) -> float:
    """A float32 feature as the shortest decimal that reads back to the same float32."""
    return float(f"{v:.9g}") if v == v else 0.0


def encode_rows(gateway_id: str, component: str, rows: Sequence[FeedbackRow], *,
                seq: int = 0, dropped: int = 0) -> bytes:
    """A batch of rows as compact JSON: ``{"v", "kind": "rows", "gateway", "component",
    "seq", "dropped", "models": [...], "rows": [[at, model index, topic, label, confidence,
    [features]], ...]}``."""
    models: dict[str, int] = {}
    out = []
    for r in rows:
        mi = models.setdefault(r.model, len(models))
        conf = round(r.confidence, 6) if r.confidence == r.confidence else None
        out.append([round(r.at, 3), mi, r.topic, r.label, conf,
                    [_short(v) for v in r.features]])
    doc = {"v": FORMAT, "kind": "rows", "gateway": gateway_id, "component": component,
           "seq": seq, "dropped": dropped, "models": list(models), "rows": out}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def encode_verdicts(gateway_id: str, verdicts: Sequence[dict[str, Any]]) -> bytes:
    """Operator verdicts (with what the gateway knows of each incident) as JSON."""
    doc = {"v": FORMAT, "kind": "verdicts", "gateway": gateway_id, "verdicts": list(verdicts)}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class FeedbackBatch:
    """A decoded batch: ``rows`` (kind "rows") or ``verdicts`` (kind "verdicts")."""

    kind: str
    gateway: str
    component: str
    rows: tuple[FeedbackRow, ...] = ()
    verdicts: tuple[dict[str, Any], ...] = ()
    seq: int = 0
    dropped: int = 0


def _need(cond: bool, detail: str) -> None:
    if not cond:
        raise FeedbackError("malformed", detail)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def decode_feedback(data: bytes, max_bytes: int = 16 << 20) -> FeedbackBatch:
    """Parse and check one batch; :class:`FeedbackError` (``too-large``, ``malformed``,
    ``version``, ``width``) names what is wrong."""
    if len(data) > max_bytes:
        raise FeedbackError("too-large", f"{len(data)} bytes (limit {max_bytes})")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FeedbackError("malformed", f"not JSON: {exc}") from None
    _need(isinstance(doc, dict), "not a JSON object")
    if doc.get("v") != FORMAT:
        raise FeedbackError("version", f"format {doc.get('v')!r}, this reads {FORMAT}")
    kind, gw = doc.get("kind"), doc.get("gateway")
    _need(isinstance(gw, str) and bool(gw), "no gateway")
    if kind == "verdicts":
        vs = doc.get("verdicts")
        _need(isinstance(vs, list), "verdicts is not a list")
        for i, v in enumerate(vs):
            _need(isinstance(v, dict) and isinstance(v.get("incident"), str)
                  and v.get("verdict") in VERDICTS, f"verdict {i} has no incident / verdict")
        return FeedbackBatch("verdicts", gw, INCIDENTS, verdicts=tuple(vs))
    _need(kind == "rows", f"unknown kind {kind!r}")
    comp = doc.get("component")
    _need(comp in CONTRACTS, f"unknown component {comp!r}")
    width, labels = len(CONTRACTS[comp][0]), len(CONTRACTS[comp][1])
    models, rows = doc.get("models"), doc.get("rows")
    _need(isinstance(models, list) and all(isinstance(m, str) for m in models),
          "models is not a list of strings")
    _need(isinstance(rows, list), "rows is not a list")
    out = []
    for i, r in enumerate(rows):
        _need(isinstance(r, list) and len(r) == 6, f"row {i} is not [at, model, topic, "
              "label, confidence, features]")
        at, mi, topic, label, conf, x = r
        _need(_num(at) and isinstance(mi, int) and 0 <= mi < len(models)
              and isinstance(topic, str) and isinstance(label, int)
              and 0 <= label < labels and (conf is None or _num(conf))
              and isinstance(x, list), f"row {i} has a wrong field")
        if len(x) != width or not all(_num(v) for v in x):
            raise FeedbackError("width", f"row {i} has {len(x)} features, {comp} takes "
                                         f"{width} numbers")
        out.append(FeedbackRow(float(at), models[mi], topic, label,
                               math.nan if conf is None else float(conf),
                               tuple(float(v) for v in x)))
    seq, dropped = doc.get("seq", 0), doc.get("dropped", 0)
    _need(isinstance(seq, int) and isinstance(dropped, int), "seq / dropped not integers")
    return FeedbackBatch("rows", gw, comp, rows=tuple(out), seq=seq, dropped=dropped)
