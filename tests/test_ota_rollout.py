"""The staged rollout's decisions (sans I/O): stages grow 1 -> 10 % -> 50 % -> 100 % only
when the gateways of the stage report the sequence active, halt for good at the error
threshold (the next group is not started), count silent gateways as failed after the stage
timeout, and resume from the saved state."""

from __future__ import annotations

import json

import pytest

from rapidmq_edge.ota.rollout import GatewayReport, Rollout, parse_stages, stage_size

FLEET = [f"gw-{i:02d}" for i in range(20)]


def active(gws: tuple[str, ...] | list[str], seq: int = 7) -> list[GatewayReport]:
    return [GatewayReport(g, "active", seq) for g in gws]


def test_stages_grow_only_on_success_and_end_on_the_class_topic() -> None:
    r = Rollout("priority", 7)
    seen: list[str] = []
    s = r.step(FLEET, 0.0)
    assert s.targets == ("gw-00",) and not s.to_class
    seen += s.targets
    assert r.step(FLEET, 1.0).targets == ()  # waiting for gw-00
    r.observe([GatewayReport("gw-00", "downloading", 7), GatewayReport("gw-05", "active", 7)])
    assert r.step(FLEET, 2.0).targets == ()  # gw-05 is not in the rollout yet
    r.observe(active(["gw-00"], seq=6))  # an older sequence does not count
    assert r.step(FLEET, 3.0).targets == ()
    r.observe(active(["gw-00"]))
    s = r.step(FLEET, 4.0)
    assert s.targets == ("gw-01",)  # 10 % of 20 = 2 in total
    seen += s.targets
    r.observe(active(seen))
    s = r.step(FLEET, 5.0)
    assert len(s.targets) == 8 and not s.to_class  # 50 % = 10 in total
    seen += s.targets
    r.observe(active(seen))
    s = r.step(FLEET, 6.0)
    assert len(s.targets) == 10 and s.to_class
    seen += s.targets
    assert sorted(seen) == FLEET
    r.observe(active(seen))
    assert r.step(FLEET, 7.0).done


def test_a_failing_stage_halts_and_the_next_group_never_starts() -> None:
    r = Rollout("threat", 3, stages=("2", "50%", "100%"), max_failure=0.2)
    first = r.step(FLEET, 0.0).targets
    r.observe([GatewayReport(first[0], "active", 3),
               GatewayReport(first[1], "rejected", 3, "shadow gate: agreement 0.61 < 0.95")])
    s = r.step(FLEET, 1.0)
    assert s.halted and "1 of 2 gateways failed" in s.reason
    assert r.step(FLEET, 2.0).halted and r.targeted == list(first)  # stays halted
    assert "agreement 0.61" in r.failed[first[1]]


def test_silent_gateways_fail_the_stage_after_its_timeout() -> None:
    r = Rollout("priority", 9, stages=("1", "100%"), stage_timeout=60.0)
    r.step(FLEET, 0.0)
    assert not r.step(FLEET, 59.0).halted
    s = r.step(FLEET, 60.0)
    assert s.halted and "1 silent" in s.reason


def test_failures_below_the_threshold_let_it_go_on() -> None:
    r = Rollout("priority", 4, stages=("10", "100%"), max_failure=0.2)
    first = r.step(FLEET, 0.0).targets
    r.observe(active(first[:8], seq=4) + [GatewayReport(g, "rolled-back", 4, "crash loop")
                                         for g in first[8:]])
    s = r.step(FLEET, 1.0)
    assert s.to_class and len(s.targets) == 10  # 2 of 10 failed = 20 %: not above


def test_resumes_from_its_saved_state() -> None:
    r = Rollout("priority", 7)
    r.step(FLEET, 0.0)
    r.observe(active(["gw-00"]))
    saved = json.loads(json.dumps(r.to_dict()))
    again = Rollout.from_dict(saved)
    assert again.step(FLEET, 1.0).targets == ("gw-01",)
    assert again.to_dict()["succeeded"] == ["gw-00"]


def test_stage_sizes_and_parsing() -> None:
    assert parse_stages("1, 10%,50%,100%") == ("1", "10%", "50%", "100%")
    assert [stage_size(s, 20) for s in ("1", "10%", "50%", "100%")] == [1, 2, 10, 20]
    assert stage_size("10%", 3) == 1 and stage_size("5", 3) == 3
    for bad in ("0,100%", "10%", "1,150%,100%", "x,100%", "1,50%"):
        with pytest.raises(ValueError):
            parse_stages(bad)
