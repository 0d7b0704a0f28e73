"""The ``intelligence:`` section of ``rapidmq-edge status`` (from status.json's
``"intelligence"`` key, written by :meth:`IntelligenceRuntime.snapshot`)."""

from __future__ import annotations

from typing import Any


def intelligence_lines(intel: dict[str, Any] | None) -> list[str]:
    """Models and versions, fallback, scoring cost, alerts, summaries and threats."""
    if not intel:
        return []
    models = intel.get("models") or {}

    def model(name: str, m: dict[str, Any]) -> str:
        if m.get("source") == "model":
            return f"{name} {m.get('version', '?')}"
        if m.get("fallback"):
            return f"{name} RULES (fallback)"
        return f"{name} {m.get('source', '?')}"

    lines = ["  intelligence: " + (", ".join(model(k, v) for k, v in models.items()) or "-")]
    if intel.get("fallback_active"):
        why = "; ".join(f"{k}: {v['fallback']}" for k, v in models.items() if v.get("fallback"))
        lines.append(f"    FALLBACK ACTIVE: {why}")
    lines.append(
        f"    scored {intel.get('scored', 0)} ({intel.get('scores_per_s', 0)}/s, mean batch "
        f"{intel.get('mean_batch', 0)}, {intel.get('score_us_per_message', 0)} µs/msg); "
        f"{intel.get('streams', 0)} streams watched ({intel.get('device_times', 0)} readings "
        f"on their own clock); priority cache hits {intel.get('priority_cache_hits', 0)}"
    )
    inc = intel.get("incidents") or {}
    lines.append(
        f"    incidents open {inc.get('open', 0)} (opened {inc.get('opened', 0)}, closed "
        f"{inc.get('closed', 0)}); alerts {intel.get('alerts', 0)} (suppressed "
        f"{intel.get('alerts_suppressed', 0)}, not queued {intel.get('alerts_not_queued', 0)})"
    )
    if intel.get("summarising"):
        lines.append(f"    summaries ACTIVE ({intel.get('summarising_reason', '')}); "
                     f"{intel.get('summarised_readings', 0)} readings in "
                     f"{intel.get('summaries', 0)} summaries")
    else:
        lines.append(f"    summaries off ({intel.get('summarising_episodes', 0)} episodes, "
                     f"{intel.get('summaries', 0)} summaries so far)")
    threat = intel.get("threat")
    if threat:
        acted = threat.get("disconnected", 0) + threat.get("refused_connects", 0)
        detected = ", ".join(f"{k} {v}" for k, v in (threat.get("detected") or {}).items() if v)
        lines.append(f"    threats acted on {acted} (disconnected {threat.get('disconnected', 0)}"
                     f", refused {threat.get('refused_connects', 0)}, banned now "
                     f"{threat.get('banned', 0)}); detected {detected or 'none'}")
        for r in (threat.get("recent") or [])[-3:]:
            lines.append(f"      {r}")
    return lines
