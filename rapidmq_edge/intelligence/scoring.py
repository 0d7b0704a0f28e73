"""One micro-batch through the features and the models (the runtime's worker side).

:class:`BatchScorer` turns a batch of messages into a priority label per message that needs
one and an anomaly label per numeric reading, with as little Python per message as the
answers allow, none of which changes an answer:

* each payload's *template* (its head with every digit replaced by "0") is computed once
  and serves both models: the priority label is remembered per (topic, template, length,
  QoS, retain), which is exactly what :func:`~.features.message_features` builds a row
  from, and the template tells where the reading's number is (:func:`~.streams.value_span`),
  so a known layout costs one slice instead of a regex scan;
* stream state lives in plain floats (:class:`~.streams.StreamTable`), a warmed-up stream
  takes a fast path with the update's branches decided, and a reading inside the anomaly
  gate's proven "none" box (:mod:`.healthy_region`) is checked before any array exists and skips the
  model.

Stream state is touched by one thread only (the runtime's worker), in batch order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .features import PAYLOAD_HEAD, message_features
from .healthy_region import healthy_region_for
from .models import Scorer
from .streams import PARSE, TEMPLATE, Box, StreamTable, reading_value, value_span

#: remembered priority labels, and JSON value layouts, before each cache starts over
CACHE_MAX = 65_536
LAYOUTS_MAX = 4096


@dataclass(slots=True)
class Scored:
    """What the worker computed for one batch."""

    priority: list[int] | None  # class label index per message needing one (else -1)
    values: list[float | None]
    anomaly: list[int] | None  # label index per message with a value (else 0)
    confidence: list[float] | None
    seconds: float


class BatchScorer:
    """Features and models for micro-batches; counts what its shortcuts saved."""

    def __init__(self, priority: Scorer, anomaly: Scorer, values_needed: bool,
                 skip_healthy: bool = True) -> None:
        self.priority = priority
        self.anomaly = anomaly
        #: readings in this region are "none" without asking the anomaly scorer
        #: (:mod:`.healthy_region`)
        self.healthy = healthy_region_for(anomaly) if skip_healthy else None
        self.box = (Box(self.healthy.lo.tolist(), self.healthy.hi.tolist()) if self.healthy
                    else None)
        self.values_needed = values_needed or anomaly.source != "off"
        self.streams = StreamTable()
        self._labels: dict[tuple[str, bytes, int, int, bool], int] = {}
        self._spans: dict[bytes, tuple[int, int]] = {}
        self.cache_hits = 0
        self.skipped = 0  # readings inside the healthy region: the model was not asked

    def score(self, topics: Sequence[str], payloads: Sequence[bytes], qos: Sequence[int],
              retain: Sequence[bool], times: Sequence[float], need: Sequence[int]) -> Scored:
        """Priority labels for the messages ``need`` indexes (ascending), readings and
        anomaly labels for all (``times`` in seconds, only differences matter)."""
        t0 = time.perf_counter()
        n = len(topics)
        tpl = TEMPLATE
        head = PAYLOAD_HEAD
        templates = [p[:head].translate(tpl) for p in payloads]
        prio = None
        if need and self.priority.source != "off":
            prio = self._priority_labels(topics, payloads, templates, qos, retain, need)
        anomaly = conf = None
        if self.values_needed:
            values, idx = self._values(payloads, templates)
            if idx and self.anomaly.source != "off":
                anomaly, conf = self._anomaly(n, list(map(topics.__getitem__, idx)),
                                              list(map(times.__getitem__, idx)),
                                              list(map(values.__getitem__, idx)), idx)
        else:
            values = [None] * n
        return Scored(prio, values, anomaly, conf, time.perf_counter() - t0)

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

    def _anomaly(self, n: int, keys: list[str], ts: list[float], xs: list[float | None],
                 idx: list[int]) -> tuple[list[int] | None, list[float] | None]:
        """Anomaly labels and confidences of a batch of ``n`` messages whose readings
        ``xs`` (at times ``ts`` of streams ``keys``) are at ``idx`` (None when none was
        outside the healthy region)."""
        # plain float rows; the region's box is checked before any array exists
        pos, rows = self.streams.update_outside(keys, ts, xs, self.box)  # type: ignore[arg-type]
        self.skipped += len(idx) - len(pos)
        if not pos:
            return None, None
        if len(pos) < len(idx):
            idx = [idx[j] for j in pos]
        lab, c = self.anomaly.predict(np.array(rows, dtype=np.float32))
        anomaly = [0] * n
        conf = [0.0] * n
        for i, a, p in zip(idx, lab.tolist(), c.tolist(), strict=True):
            anomaly[i] = a
            conf[i] = p
        return anomaly, conf
