"""Configuration of the edge-intelligence runtime: ``[intelligence]``.

Validated with the same rules and messages as :mod:`rapidmq_edge.config`. Absent or
``enabled = false``: nothing of the runtime is built and no message is touched.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..mqtt.topics import valid_topic_filter
from .checks import (
    Table,
    boolean,
    config_error,
    float_range,
    int_range,
    one_of,
    path_under,
    show,
    string,
)
from .forwarding import PRIORITIES

#: what drives a decision: the ONNX model (rules when it cannot be loaded), the rules, nothing
MODES = ("model", "rules", "off")
#: the anomaly detection: the per-stream detector (``model`` and ``rules``, the earlier
#: per-reading classifier and its rules, now mean the detector too), or nothing
ANOMALY_MODES = ("detector", "model", "rules", "off")
#: ``[[intelligence.streams]] sensitivity`` values
SENSITIVITIES = ("normal", "low", "very_low", "off")
#: the priority model's labels (``rapidmq_edge.intelligence.features.PRIORITY_LABELS``)
PRIORITY_LABELS = ("critical", "high", "normal", "bulk")
THREAT_ACTIONS = ("disconnect", "throttle", "log")


def _default_models_dir() -> Path:
    """``models/`` of a checkout, else where the wheel installs them (``share/``)."""
    checkout = Path(__file__).resolve().parents[2] / "models"
    if (checkout / "priority.json").is_file():
        return checkout
    return Path(sys.prefix) / "share" / "rapidmq-edge" / "models"


#: the shipped models: a checkout's ``models/``, or ``<prefix>/share/rapidmq-edge/models``
DEFAULT_MODELS_DIR = _default_models_dir()


def _default_classes() -> dict[str, int]:
    return {"critical": 0, "high": 1, "normal": 2, "bulk": 3}


@dataclass(frozen=True, slots=True)
class IntelligenceSettings:
    """``[intelligence]``: models, micro-batching, and what the scores drive."""

    enabled: bool = False
    models_dir: Path = DEFAULT_MODELS_DIR
    priority: str = "model"
    anomaly: str = "detector"
    threat: str = "model"
    batch_window_ms: float = 1.0  # longest wait of a message for its micro-batch
    max_batch: int = 256  # a batch this large is scored at once
    worker_thread: bool = True  # score in a worker thread (onnxruntime releases the GIL)
    inline_max_batch: int = 32  # batches up to this size are scored on the event loop
    #: priority label -> store class number ([intelligence.classes], values are class names)
    classes: dict[str, int] = field(default_factory=_default_classes)
    alert_topic: str = "$edge/alerts"  # local: <alert_topic>/<kind>/<stream topic>
    alert_upstream_topic: str = "alerts"  # upstream: <prefix><this>/<kind>/<stream topic>
    alert_cooldown_s: float = 0.0  # no longer used: incidents close after normal readings
    #: an anomaly incident closes after this many normal readings of its stream
    episode_close_readings: int = 216
    #: incidents announced per stream and hour of its own time; more are counted
    alerts_per_stream_hour: int = 6
    #: (topic filter, sensitivity) rules, first match wins ([[intelligence.streams]])
    streams: tuple[tuple[str, str], ...] = ()
    #: the gateway watches its own metrics with the same detector, every this many seconds
    health: bool = True
    health_interval_s: float = 10.0
    summarise_classes: tuple[int, ...] = (2, 3)
    summarise_backlog_messages: int = 0  # 0 = not on this criterion
    summarise_backlog_bytes: int = 0
    summarise_disk_percent: float = 0.0
    summary_window_s: float = 60.0
    summary_suffix: str = "/summary"
    pressure_check_s: float = 1.0  # how often backlog and disk are looked at
    threat_interval_s: float = 1.0  # how often active clients are scored
    threat_action: str = "disconnect"
    threat_min_events: int = 10  # a client with fewer events in its window is not judged
    threat_min_confidence: float = 0.7  # the model's probability needed to disconnect
    throttle_rate: float = 2.0  # PUBLISH/s of a throttled client (0 = no throttle step)
    throttle_min_confidence: float = 0.5  # probability from which a client is throttled
    ban_s: float = 60.0  # an abusive client id is refused (CONNACK 0x8A) this long
    flood_rate: float = 200.0  # PUBLISH/s any client may sustain
    flood_factor: float = 10.0  # ... or this many times its own normal rate
    flood_burst: int = 1000  # messages above that before it is a flood
    #: glob patterns of usernames / client ids the threat watch never judges (bridges, PLCs,
    #: line controllers that legitimately publish thousands of messages a second)
    threat_exempt_users: tuple[str, ...] = ()
    threat_exempt_clients: tuple[str, ...] = ()

    @property
    def summarising(self) -> bool:
        """True when any summarisation threshold is set."""
        return bool(self.summarise_backlog_messages or self.summarise_backlog_bytes
                    or self.summarise_disk_percent)


def _classes(data: object, key: str) -> dict[str, int]:
    t = Table(data, key, PRIORITY_LABELS)
    out = _default_classes()
    for label in PRIORITY_LABELS:
        if label in t.data:
            value = t.data[label]
            if not isinstance(value, str) or value not in PRIORITIES:
                names = ", ".join(f'"{n}"' for n in PRIORITIES)
                raise config_error(t.sub(label), f"must be one of {names}, got {show(value)}")
            out[label] = PRIORITIES[value]
    return out


def _class_list(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise config_error(key, f"must be an array of class names, got {show(value)}")
    for v in value:
        if v not in PRIORITIES:
            names = ", ".join(f'"{n}"' for n in PRIORITIES)
            raise config_error(key, f"must hold only {names}, got {show(v)}")
    return tuple(sorted({PRIORITIES[v] for v in value}))


def _patterns(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise config_error(key, f"must be an array of non-empty glob patterns, got {show(value)}")
    return tuple(value)


def _topic_root(key: str, value: Any) -> str:
    s = string(key, value).strip("/")
    if not s or "+" in s or "#" in s or "\x00" in s:
        raise config_error(key, f"must be a topic without wildcards, got {show(value)}")
    return s


def _stream_rules(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise config_error(key, f"must be an array of tables ([[{key}]]), got {show(value)}")
    out = []
    for i, item in enumerate(value):
        t = Table(item, f"{key}[{i}]", ("filter", "sensitivity"))
        filt = t.get("filter", string, "")
        if not valid_topic_filter(filt):
            raise config_error(t.sub("filter"), f"must be a topic filter, got {show(filt)}")
        out.append((filt, t.get("sensitivity", one_of(*SENSITIVITIES), "normal")))
    return tuple(out)


def parse_intelligence(data: object, base_dir: Path) -> IntelligenceSettings:
    """Validate ``[intelligence]``."""
    t = Table(data, "intelligence", (
        "enabled", "models_dir", "priority", "anomaly", "threat", "batch_window_ms",
        "max_batch", "worker_thread", "inline_max_batch", "classes", "alert_topic",
        "alert_upstream_topic",
        "alert_cooldown_s", "episode_close_readings", "alerts_per_stream_hour", "streams",
        "health", "health_interval_s",
        "summarise_classes", "summarise_backlog_messages",
        "summarise_backlog_bytes", "summarise_disk_percent", "summary_window_s",
        "summary_suffix", "pressure_check_s", "threat_interval_s", "threat_action", "ban_s",
        "threat_min_events", "threat_min_confidence", "throttle_rate",
        "throttle_min_confidence", "threat_exempt_users", "threat_exempt_clients",
        "flood_rate", "flood_factor", "flood_burst",
    ))
    suffix = t.get("summary_suffix", string, "/summary")
    if not suffix or "+" in suffix or "#" in suffix:
        raise config_error(t.sub("summary_suffix"), f"must be a topic suffix, got {show(suffix)}")
    return IntelligenceSettings(
        enabled=t.get("enabled", boolean, False),
        models_dir=t.get("models_dir", path_under(base_dir), DEFAULT_MODELS_DIR),
        priority=t.get("priority", one_of(*MODES), "model"),
        anomaly="off" if t.get("anomaly", one_of(*ANOMALY_MODES), "detector") == "off"
        else "detector",
        threat=t.get("threat", one_of(*MODES), "model"),
        batch_window_ms=t.get("batch_window_ms", float_range(0.0, 1000.0), 1.0),
        max_batch=t.get("max_batch", int_range(1, 65536), 256),
        worker_thread=t.get("worker_thread", boolean, True),
        inline_max_batch=t.get("inline_max_batch", int_range(0, 65536), 32),
        classes=_classes(t.data["classes"], t.sub("classes")) if "classes" in t.data
        else _default_classes(),
        alert_topic=t.get("alert_topic", _topic_root, "$edge/alerts"),
        alert_upstream_topic=t.get("alert_upstream_topic", _topic_root, "alerts"),
        alert_cooldown_s=t.get("alert_cooldown_s", float_range(0.0, 86400.0), 0.0),
        episode_close_readings=t.get("episode_close_readings", int_range(1, 10**7), 216),
        alerts_per_stream_hour=t.get("alerts_per_stream_hour", int_range(1, 10**6), 6),
        streams=t.get("streams", _stream_rules, ()),
        health=t.get("health", boolean, True),
        health_interval_s=t.get("health_interval_s", float_range(0.01, 3600.0), 10.0),
        summarise_classes=t.get("summarise_classes", _class_list, (2, 3)),
        summarise_backlog_messages=t.get("summarise_backlog_messages", int_range(0, 10**12), 0),
        summarise_backlog_bytes=t.get("summarise_backlog_bytes", int_range(0, 10**15), 0),
        summarise_disk_percent=t.get("summarise_disk_percent", float_range(0.0, 100.0), 0.0),
        summary_window_s=t.get("summary_window_s", float_range(0.05, 86400.0), 60.0),
        summary_suffix=suffix,
        pressure_check_s=t.get("pressure_check_s", float_range(0.05, 3600.0), 1.0),
        threat_interval_s=t.get("threat_interval_s", float_range(0.05, 3600.0), 1.0),
        threat_action=t.get("threat_action", one_of(*THREAT_ACTIONS), "disconnect"),
        ban_s=t.get("ban_s", float_range(0.0, 7 * 86400.0), 60.0),
        flood_rate=t.get("flood_rate", float_range(1.0, 10_000_000.0), 200.0),
        flood_factor=t.get("flood_factor", float_range(1.0, 1000.0), 10.0),
        flood_burst=t.get("flood_burst", int_range(1, 10**9), 1000),
        threat_min_events=t.get("threat_min_events", int_range(1, 10**9), 10),
        threat_min_confidence=t.get("threat_min_confidence", float_range(0.0, 1.0), 0.7),
        throttle_rate=t.get("throttle_rate", float_range(0.0, 1_000_000.0), 2.0),
        throttle_min_confidence=t.get("throttle_min_confidence", float_range(0.0, 1.0), 0.5),
        threat_exempt_users=t.get("threat_exempt_users", _patterns, ()),
        threat_exempt_clients=t.get("threat_exempt_clients", _patterns, ()),
    )


__all__ = ["ANOMALY_MODES", "MODES", "SENSITIVITIES", "IntelligenceSettings",
           "parse_intelligence"]
