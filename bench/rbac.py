"""RBAC decision cost (``rapidmq_edge/security/rbac.py``) with many rules.

One client holds every rule (``--rules``, default 1,000: 50 roles of 20 rules, each role
mixing publish / subscribe / receive rules, literal first levels and ``+`` / ``#`` ones,
placeholders and qualifiers), so every decision could have to look at all of them. Measured
per call with ``perf_counter_ns`` through the gateway's entry point (``Gatekeeper`` with a
``LiveRbac`` on a real SQLite file, reload check included):

* ``cached``: a working set of 1,000 (client, topic) questions asked again and again (the
  decision cache: the steady state of a device fleet publishing to its topics);
* ``uncached``: a new topic each time (the client's bound rule tables are reused, the
  decision is computed: rules indexed by first level, first match in order);
* ``first``: a new client each time (its 1,000 rules bound and indexed: once per client per
  rules generation).

Target (issue 18): p99 <= 20 us per decision with 1,000 rules, cached.

    .venv/bin/python bench/rbac.py [--rules 1000] [--n 200000]

prints one JSON document (p50 / p99 / max in microseconds per kind of decision).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from rapidmq_edge.security.acl import Acl
from rapidmq_edge.security.gatekeeper import Gatekeeper
from rapidmq_edge.security.rbac import RbacModel, Role, parse_rule
from rapidmq_edge.security.rbac_live import LiveRbac
from rapidmq_edge.security.rbac_store import RbacStore

TYPES = ("publishClientSend", "subscribePattern", "publishClientReceive", "subscribeLiteral")


def build_model(n_rules: int, seed: int = 1) -> RbacModel:
    """``n_rules`` rules in roles of 20, all granted to the group ``fleet``."""
    rng = random.Random(seed)
    model = RbacModel().add_group("fleet").join("fleet", "user", "dev")
    per_role = 20
    for r in range((n_rules + per_role - 1) // per_role):
        rules = []
        for _i in range(min(per_role, n_rules - r * per_role)):
            kind = rng.random()
            if kind < 0.6:
                topic = f"site{rng.randrange(40)}/dev{rng.randrange(200)}/#"
            elif kind < 0.8:
                topic = f"site{rng.randrange(40)}/+/{rng.choice(['temp', 'hum', 'cmd'])}"
            elif kind < 0.9:
                topic = "+/${clientid}/" + rng.choice(["temp", "hum", "#"])
            else:
                topic = f"tenant/${{username}}/{rng.randrange(100)}/#"
            qos = [0, 1] if rng.random() < 0.2 else None
            rules.append(parse_rule(rng.choice(TYPES), topic,
                                    "deny" if rng.random() < 0.3 else "allow",
                                    rng.randrange(-5, 5), qos))
        model = model.put_role(Role(f"role{r}", tuple(rules)))
        model = model.grant("group", "fleet", f"role{r}")
    return model


def _pcts(samples: list[int]) -> dict[str, float]:
    s = sorted(samples)
    return {"p50_us": round(s[len(s) // 2] / 1000, 2),
            "p99_us": round(s[int(len(s) * 0.99)] / 1000, 2),
            "max_us": round(s[-1] / 1000, 2),
            "mean_us": round(statistics.fmean(s) / 1000, 2), "n": len(s)}


def _topic(rng: random.Random) -> str:
    return f"site{rng.randrange(40)}/dev{rng.randrange(200)}/{rng.choice(['temp', 'hum'])}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--n", type=int, default=200_000, help="cached decisions to time")
    args = ap.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rbac.sqlite"
        store = RbacStore(path)
        model = build_model(args.rules)
        store.edit(lambda _m: model)
        store.close()
        live = LiveRbac(path, None)
        gk = Gatekeeper(True, None, Acl([], "deny"), live)
        clock = time.perf_counter_ns
        pub, recv = gk.can_publish, gk.can_receive
        # cached: 1,000 (client, topic) pairs, asked over and over
        working = [(f"c{rng.randrange(50)}", _topic(rng)) for _ in range(1000)]
        for cid, topic in working:  # warm
            pub("dev", cid, topic, 1, False)
        cached: list[int] = []
        for i in range(args.n):
            cid, topic = working[i % 1000]
            t0 = clock()
            pub("dev", cid, topic, 1, False)
            cached.append(clock() - t0)
        # uncached: fresh topics for known clients (receive check: three rule tables)
        uncached: list[int] = []
        for i in range(20_000):
            topic = f"{_topic(rng)}/{i}"
            t0 = clock()
            recv("dev", "c1", topic)
            uncached.append(clock() - t0)
        # first decision of a new client: bind and index its rules
        first: list[int] = []
        for i in range(300):
            t0 = clock()
            pub("dev", f"new{i}", "site1/dev1/temp", 0, False)
            first.append(clock() - t0)
        decided = live.policy()
        allowed = sum(pub("dev", cid, t, 1, False) for cid, t in working)
        live.close()
    print(json.dumps({
        "rules": decided.rule_count, "generation": decided.generation,
        "allowed_of_working_set": allowed,
        "cached": _pcts(cached), "uncached": _pcts(uncached), "first_of_client": _pcts(first),
        "target_p99_us": 20.0, "load_average": [round(x, 2) for x in os.getloadavg()],
    }, indent=2))


if __name__ == "__main__":
    main()
