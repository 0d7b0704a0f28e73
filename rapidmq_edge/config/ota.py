"""``[ota]``: over-the-air model updates (docs/ota.md). Absent or ``enabled = false``: the
gateway neither subscribes to manifests nor touches its models.

Validated with the same rules and messages as the rest of :mod:`rapidmq_edge.config`; the
trust files must exist (that they hold operator public keys is checked where they are loaded,
:class:`rapidmq_edge.ota.trust.TrustAnchors`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import (
    Table,
    boolean,
    config_error,
    existing_file,
    float_range,
    int_range,
    show,
    string,
)

__all__ = ["OtaSettings", "parse_ota"]

_CLASS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True, slots=True)
class OtaSettings:
    """``[ota]``; ``upstream`` None = the first ``[[upstream]]``."""

    enabled: bool = False
    #: operator public key files (COSE_Key, ``rapidmq-edge ota keys init``)
    trust: tuple[Path, ...] = ()
    #: distinct trusted ML-DSA-65 signatures a manifest needs
    trust_threshold: int = 1
    gateway_class: str = "default"
    prefix: str = "rapidmq/ota"
    upstream: str | None = None
    max_payload_bytes: int = 64 << 20
    #: chunks requested at once
    chunk_window: int = 8
    #: payload bytes per second (0 = no cap)
    bandwidth: int = 0
    shadow_min_messages: int = 1000
    shadow_min_seconds: float = 60.0
    shadow_min_agreement: float = 0.95
    #: this many gateway starts within ``crashloop_window`` seconds after a promotion, without
    #: a healthy period, roll the model back
    crashloop_starts: int = 3
    crashloop_window: float = 300.0
    #: the feedback loop: upload sampled scored rows and incident verdicts upstream
    feedback: bool = False
    #: rows sampled at most per minute, and held at most while the upload cannot keep up
    feedback_rows_per_minute: int = 60
    feedback_buffer: int = 1000
    #: seconds between uploads (a verdict is uploaded at once)
    feedback_interval: float = 10.0


def _paths(base_dir: Path) -> Any:
    one = existing_file(base_dir)

    def check(key: str, value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise config_error(key, f"must be an array of key file paths, got {show(value)}")
        return tuple(one(f"{key}[{i}]", v) for i, v in enumerate(value))

    return check


def _prefix(key: str, value: Any) -> str:
    s = string(key, value).strip("/")
    if not s or "+" in s or "#" in s or "\x00" in s:
        raise config_error(key, f"must be a topic without wildcards, got {show(value)}")
    return s


def _gateway_class(key: str, value: Any) -> str:
    s = string(key, value)
    if not _CLASS_RE.fullmatch(s):
        raise config_error(key, f"must be 1-64 characters of A-Z a-z 0-9 _ . -, got {show(s)}")
    return s


def parse_ota(data: object, base_dir: Path, upstreams: Sequence[str] = ()) -> OtaSettings:
    """Validate ``[ota]``; ``upstreams`` are the ``[[upstream]]`` names it may refer to."""
    t = Table(data, "ota", (
        "enabled", "trust", "trust_threshold", "gateway_class", "prefix", "upstream",
        "max_payload_bytes", "chunk_window", "bandwidth", "shadow_min_messages",
        "shadow_min_seconds", "shadow_min_agreement", "crashloop_starts", "crashloop_window",
        "feedback", "feedback_rows_per_minute", "feedback_buffer", "feedback_interval",
    ))
    d = OtaSettings()
    s = OtaSettings(
        enabled=t.get("enabled", boolean, d.enabled),
        trust=t.get("trust", _paths(base_dir), d.trust),
        trust_threshold=t.get("trust_threshold", int_range(1, 16), d.trust_threshold),
        gateway_class=t.get("gateway_class", _gateway_class, d.gateway_class),
        prefix=t.get("prefix", _prefix, d.prefix),
        upstream=t.get("upstream", string, d.upstream),
        max_payload_bytes=t.get("max_payload_bytes", int_range(1, 1 << 40), d.max_payload_bytes),
        chunk_window=t.get("chunk_window", int_range(1, 1024), d.chunk_window),
        bandwidth=t.get("bandwidth", int_range(0, 1 << 40), d.bandwidth),
        shadow_min_messages=t.get("shadow_min_messages", int_range(0, 10**12),
                                  d.shadow_min_messages),
        shadow_min_seconds=t.get("shadow_min_seconds", float_range(0.0, 30 * 86400.0),
                                 d.shadow_min_seconds),
        shadow_min_agreement=t.get("shadow_min_agreement", float_range(0.0, 1.0),
                                   d.shadow_min_agreement),
        crashloop_starts=t.get("crashloop_starts", int_range(2, 1000), d.crashloop_starts),
        crashloop_window=t.get("crashloop_window", float_range(1.0, 86400.0),
                               d.crashloop_window),
        feedback=t.get("feedback", boolean, d.feedback),
        feedback_rows_per_minute=t.get("feedback_rows_per_minute", int_range(1, 600_000),
                                       d.feedback_rows_per_minute),
        feedback_buffer=t.get("feedback_buffer", int_range(1, 10_000_000), d.feedback_buffer),
        feedback_interval=t.get("feedback_interval", float_range(0.05, 3600.0),
                                d.feedback_interval),
    )
    if s.upstream is not None and s.upstream not in upstreams:
        raise config_error(t.sub("upstream"), f"no [[upstream]] named {s.upstream!r}")
    if s.enabled:
        if not s.trust:
            raise config_error(t.sub("trust"), "required when enabled: the operator public "
                               "key file(s) manifests must be signed by")
        if not upstreams:
            raise config_error(t.sub("enabled"), "needs an [[upstream]] to fetch updates from")
        if s.trust_threshold > len(s.trust):
            raise config_error(t.sub("trust_threshold"), f"is {s.trust_threshold} but only "
                               f"{len(s.trust)} trust file(s) are given")
    return s
