"""One micro-batch through the features and the models (the runtime's worker side).

:class:`BatchScorer` turns a batch of messages into a priority label per message that needs
one and, per numeric reading, the verdict of its stream's anomaly detector
(:mod:`.stream_detector`), with as little Python per message as the answers allow:

* each payload's *template* (its head with every digit replaced by "0") is computed once
  and serves both: the priority label is remembered per (topic, template, length, QoS,
  retain), which is exactly what :func:`~.features.message_features` builds a row from,
  and the template tells where the reading's number is (:func:`~.streams.value_span`), so a
  known layout costs one slice instead of a regex scan;
* a reading is judged on the device's own clock when it carries one (``"ts"``: epoch s or
  ms, or RFC 3339; :func:`~.streams.reading_time`), so replayed or buffered data keeps its
  timing; else on its arrival time.

Detector state is touched by one thread only (the runtime's worker), in batch order.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .fault_classifier import ClassifiedTable
from .features import PAYLOAD_HEAD, message_features
from .models import Scorer, Shadow
from .stream_detector import DetectorParams, Verdict
from .streams import PARSE, TEMPLATE, reading_time, reading_value, value_span

#: remembered priority labels, and JSON value layouts, before each cache starts over
CACHE_MAX = 65_536
LAYOUTS_MAX = 4096


@dataclass(slots=True)
class Scored:
    """What the worker computed for one batch."""

    priority: list[int] | None  # class label index per message needing one (else -1)
    values: list[float | None]
    verdicts: list[Verdict | None] | None  # the stream detector's, per reading
    times: list[float] | None  # when each reading was taken (its "ts", else its arrival)
    seconds: float
    #: a shadow candidate's run on this batch's rows, for after the batch is acknowledged
    shadow: Callable[[], None] | None = None


class BatchScorer:
    """Features and models for micro-batches; counts what its shortcuts saved."""

    def __init__(self, priority: Scorer, detector: DetectorParams | None,
                 values_needed: bool, anomaly: Scorer | None = None) -> None:
        """``detector``: the anomaly detector's parameters (None: no anomaly detection);
        ``anomaly``: the fault-kind classifier beside it (None or not an ONNX model: the
        detector alone)."""
        self.priority = priority
        proba = (anomaly.probabilities if anomaly is not None and anomaly.source == "model"
                 else None)
        self.detectors = (ClassifiedTable(detector, proba) if detector is not None
                          else None)
        self.values_needed = values_needed or detector is not None
        self.device_times = 0  # readings judged on their own "ts"
        self._labels: dict[tuple[str, bytes, int, int, bool], int] = {}
        self._spans: dict[bytes, tuple[int, int]] = {}
        self.cache_hits = 0
        #: a candidate priority model scoring beside the active one (OTA shadow)
        self.shadow: Shadow | None = None
        self._next: Scorer | None = None  # the priority scorer to use from the next batch
        self._need_keys: list[tuple[str, bytes, int, int, bool]] | None = None
        self._swap_lock = threading.Lock()

    def use(self, priority: Scorer) -> None:
        """Score with ``priority`` from the next batch on (a batch in progress finishes with
        the scorer it started with; the label cache starts over with the new one)."""
        with self._swap_lock:
            self._next = priority

    def forget_labels(self) -> None:
        """Start the label caches over (an erasure: their keys hold topics). Safe from
        another thread: a batch in progress finishes with the caches it started with."""
        self._labels = {}
        shadow = self.shadow
        if shadow is not None:
            shadow.known = {}

    def score(self, topics: Sequence[str], payloads: Sequence[bytes], qos: Sequence[int],
              retain: Sequence[bool], times: Sequence[float], need: Sequence[int]) -> Scored:
        """Priority labels for the messages ``need`` indexes (ascending), readings and
        anomaly labels for all (``times`` in seconds, only differences matter)."""
        t0 = time.perf_counter()
        if self._next is not None:  # a swap: between batches, in the thread that scores
            with self._swap_lock:
                nxt, self._next = self._next, None
            if nxt is not None:
                self.priority = nxt
                self._labels = {}
        n = len(topics)
        tpl = TEMPLATE
        head = PAYLOAD_HEAD
        templates = [p[:head].translate(tpl) for p in payloads]
        prio = None
        shadow = None
        if need and self.priority.source != "off":
            self._need_keys = None
            prio = self._priority_labels(topics, payloads, templates, qos, retain, need)
            if self.shadow is not None:
                shadow = partial(_shadow_priority, self.shadow, self.priority, topics,
                                 payloads, templates, qos, retain, need, self._need_keys)
        verdicts: list[Verdict | None] | None = None
        at: list[float] | None = None
        if self.values_needed:
            values, idx = self._values(payloads, templates)
            if idx and self.detectors is not None:
                verdicts = [None] * n
                at = list(times)
                ts = self._times(payloads, times, idx)
                found = self.detectors.update(list(map(topics.__getitem__, idx)), ts,
                                              list(map(values.__getitem__, idx)))  # type: ignore[arg-type]
                for i, v, t in zip(idx, found, ts, strict=True):
                    verdicts[i] = v
                    at[i] = t
        else:
            values = [None] * n
        return Scored(prio, values, verdicts, at, time.perf_counter() - t0, shadow)

    def _times(self, payloads: Sequence[bytes], times: Sequence[float],
               idx: list[int]) -> list[float]:
        """The time of each reading at ``idx``: its own ``"ts"``, else its arrival."""
        out = list(map(times.__getitem__, idx))
        for j, i in enumerate(idx):
            p = payloads[i]
            if b"ts" in p:  # JSON "ts" or a CBOR map's ts: rare enough to look closer
                t = reading_time(p)
                if t is not None:
                    out[j] = t
                    self.device_times += 1
        return out

    def _priority_labels(self, topics: Sequence[str], payloads: Sequence[bytes],
                         templates: list[bytes], qos: Sequence[int], retain: Sequence[bool],
                         need: Sequence[int]) -> list[int]:
        """Labels (-1 where not needed): an equal (topic, template, length, qos, retain) key
        has an equal feature row, so a deterministic scorer gives it the same label. A
        device's messages repeat their keys: most messages skip features and model."""
        cache = self._labels
        n = len(topics)
        if len(need) == n:  # every message (ascending, distinct: need is range(n))
            keys = list(zip(topics, templates, map(len, payloads), qos, retain, strict=True))
            self._need_keys = keys  # the shadow's keys too
            out: list[int] = list(map(cache.get, keys))  # type: ignore[arg-type]
            if None not in out:
                self.cache_hits += n
                return out
            miss = [i for i, v in enumerate(out) if v is None]
            keys = [keys[i] for i in miss]
        else:
            out = [-1] * n
            miss, keys = [], []
            for i in need:
                key = (topics[i], templates[i], len(payloads[i]), qos[i], retain[i])
                v = cache.get(key)
                if v is None:
                    miss.append(i)
                    keys.append(key)
                else:
                    out[i] = v
        X = message_features([topics[i] for i in miss], [payloads[i] for i in miss],
                             [qos[i] for i in miss], [retain[i] for i in miss])
        labels = self.priority.predict_labels(X)
        if len(cache) + len(miss) > CACHE_MAX:
            cache.clear()
        for i, key, lab in zip(miss, keys, labels, strict=True):
            out[i] = lab
            cache[key] = lab
        self.cache_hits += len(need) - len(miss)
        return out

    def _values(self, payloads: Sequence[bytes],
                templates: list[bytes]) -> tuple[list[float | None], list[int]]:
        """:func:`~.streams.reading_value` of every payload, through its template's layout,
        and the positions of those that have one."""
        spans = self._spans
        head = PAYLOAD_HEAD
        isfinite = math.isfinite
        out: list[float | None] = [None] * len(payloads)
        idx: list[int] = []
        keep = idx.append
        for i, (p, sp) in enumerate(zip(payloads, map(spans.get, templates), strict=True)):
            if sp is None:  # a template not seen yet
                if len(p) > head:  # the template is the head's only: no layout for it
                    v = reading_value(p)
                    if v is not None:
                        out[i] = v
                        keep(i)
                    continue
                tp = templates[i]
                sp = value_span(tp)
                if tp[:1] == b"{":  # JSON objects: a fleet has few layouts (CBOR, text: many)
                    if len(spans) >= LAYOUTS_MAX:
                        spans.clear()
                    spans[tp] = sp
            a = sp[0]
            if a < 0:
                if sp is PARSE:
                    v = reading_value(p)
                    if v is not None:
                        out[i] = v
                        keep(i)
                continue
            f = float(p[a:sp[1]])
            if isfinite(f):
                out[i] = f
                keep(i)
        return out, idx


def _shadow_priority(shadow: Shadow, active: Scorer, topics: Sequence[str],
                     payloads: Sequence[bytes], templates: list[bytes], qos: Sequence[int],
                     retain: Sequence[bool], need: Sequence[int],
                     keys: list[tuple[str, bytes, int, int, bool]] | None) -> None:
    """The shadow candidate on the priority rows of a batch (keyed like the label cache;
    ``keys``: the batch's keys when the label cache already built them)."""
    if keys is None:
        keys = [(topics[i], templates[i], len(payloads[i]), qos[i], retain[i]) for i in need]

    def rows(pos: list[int]) -> np.ndarray:
        idx = [need[j] for j in pos]
        return message_features([topics[i] for i in idx], [payloads[i] for i in idx],
                                [qos[i] for i in idx], [retain[i] for i in idx])

    shadow.keyed(active, keys, rows)
