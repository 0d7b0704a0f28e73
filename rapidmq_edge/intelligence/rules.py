"""Rule-based defaults (fixed thresholds) for when a model is missing or fails.

Each function takes the same feature rows as the corresponding model
(:mod:`.features`) and returns class indices into the same label tuple, so the runtime
can swap a model for its rules without changing anything else. ``bench/intelligence.py``
measures these rules side by side with the models.
"""

from __future__ import annotations

import numpy as np

from .features import (
    ANOMALY_LABELS,
    CLIENT_FEATURES,
    MESSAGE_FEATURES,
    PRIORITY_LABELS,
    RESIDUAL_FEATURES,
    THREAT_LABELS,
)

_M = {name: i for i, name in enumerate(MESSAGE_FEATURES)}
_C = {name: i for i, name in enumerate(CLIENT_FEATURES)}
_R = {name: i for i, name in enumerate(RESIDUAL_FEATURES)}

#: |residual| and |change from the previous reading|, in the detector's scales, of a spike
SPIKE_Z = 6.0
#: |smoothed residual| (g_fast) of a drift or level shift
DRIFT_Z = 4.0
#: equal consecutive readings that count as a stuck sensor
STUCK_REPEATS = 2
#: log(interval / usual interval) below which a reading is part of a burst (1/4.5 of usual)
BURST_LOG_DT = -1.5
#: readings a stream needs before the rules judge it
WARM = 20
#: per 10 s window: refused logins; topics/filters touched; wildcard or $ filters; refusals;
#: publications; connections
AUTH_FAILURES, TOPICS_TOUCHED, BROAD_FILTERS, DENIED, FLOOD_PUBLISHES, FLOOD_CONNECTS = (
    3, 10, 3, 3, 100, 5)


def _kw(X: np.ndarray, *names: str) -> np.ndarray:
    return np.any(X[:, [_M[f"kw_{n}"] for n in names]] > 0, axis=1)


def priority_rules(X: np.ndarray) -> np.ndarray:
    """Priority class indices (:data:`PRIORITY_LABELS`) from :func:`message_features` rows."""
    crit = _kw(X, "critical", "CRITICAL", "FATAL", "fatal", "forced", "over_limit", "fire",
               "smoke", "intrusion")
    bulk = (_kw(X, "DEBUG", "debug", "heartbeat", "status", "battery", "spectrum", "stats",
                "kwh") | (X[:, _M["retain"]] > 0) | (X[:, _M["size_log2"]] > 9))
    high = _kw(X, "ERROR", "WARN", "error", "warn", "alarm", "alert", "event", "trouble",
               "tamper", "open", "close", "cleared")
    out = np.full(len(X), PRIORITY_LABELS.index("normal"), dtype=np.int64)
    out[high] = PRIORITY_LABELS.index("high")
    out[bulk] = PRIORITY_LABELS.index("bulk")
    out[crit] = PRIORITY_LABELS.index("critical")
    return out


def residual_rules(X: np.ndarray) -> np.ndarray:
    """Fault class indices (:data:`ANOMALY_LABELS`) from residual feature rows
    (:data:`RESIDUAL_FEATURES`): fixed thresholds in the stream detector's scales."""
    warm = X[:, _R["age_log"]] >= np.log1p(WARM)
    out = np.zeros(len(X), dtype=np.int64)
    out[warm & (np.abs(X[:, _R["g_fast"]]) >= DRIFT_Z)] = ANOMALY_LABELS.index("drift")
    out[warm & (X[:, _R["log_dt"]] <= BURST_LOG_DT)] = ANOMALY_LABELS.index("burst")
    out[warm & (np.abs(X[:, _R["z"]]) >= SPIKE_Z)
        & (np.abs(X[:, _R["dz"]]) >= SPIKE_Z)] = ANOMALY_LABELS.index("spike")
    out[warm & (X[:, _R["run_log"]] >= np.log1p(STUCK_REPEATS))] = ANOMALY_LABELS.index("stuck")
    return out


def _count(X: np.ndarray, name: str) -> np.ndarray:
    return np.expm1(X[:, _C[name]])


def threat_rules(X: np.ndarray) -> np.ndarray:
    """Threat class indices (:data:`THREAT_LABELS`) from :class:`ClientWindows` rows."""
    eps = 1e-3
    guess = _count(X, "auth_failures_log") >= AUTH_FAILURES - eps
    scan = ((_count(X, "pub_topics_log") + _count(X, "sub_filters_log") >= TOPICS_TOUCHED - eps)
            | (_count(X, "wildcard_subs_log") + _count(X, "sys_subs_log")
               >= BROAD_FILTERS - eps)
            | (_count(X, "publish_denied_log") + _count(X, "subscribe_denied_log")
               >= DENIED - eps))
    flood = ((_count(X, "publishes_log") >= FLOOD_PUBLISHES - eps)
             | (_count(X, "connects_log") - _count(X, "auth_failures_log")
                >= FLOOD_CONNECTS - eps))
    out = np.zeros(len(X), dtype=np.int64)
    out[scan] = THREAT_LABELS.index("topic_scanning")
    out[guess] = THREAT_LABELS.index("credential_guessing")
    out[flood] = THREAT_LABELS.index("flood")
    return out

