"""The per-client / per-topic cache of ACL decisions (issue 17 part 2) never serves a stale
answer: RBAC edits (a new rules generation) reach an already connected publisher and an
existing subscription at once, and the answers stay per client and per user."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rapidmq_edge.security.rbac import Role, parse_rule
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, unique, wait_until

pytestmark = pytest.mark.timeout(40)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=30)


def _delivered(pub: PahoClient, sub: PahoClient, topic: str, wait: float = 0.4) -> bool:
    sub.drain()
    marker = unique("m").encode()
    pub.publish(topic, marker, qos=1)
    return any(m.payload == marker for m in sub.drain(wait))


def test_rbac_edit_reaches_a_cached_publish_decision(
    tmp_path: Path, gateway_factory: Callable[..., GatewayProcess],
) -> None:
    from rapidmq_edge.security.rbac_store import RbacStore

    db = tmp_path / "rbac.sqlite"
    store = RbacStore(db)
    store.edit(lambda m: m.put_role(Role("reader", (
        parse_rule("subscribePattern", "data/#", "allow"),)))
        .put_role(Role("writer", (parse_rule("publishClientSend", "data/#", "allow"),)))
        .grant("client", "sub", "reader").grant("client", "pub", "writer"))
    store.close()
    gw = gateway_factory(config={"auth": {"allow_anonymous": True, "rbac": True,
                                          "rbac_db": str(db)}})
    sub, pub = PahoClient(gw.port, "sub"), PahoClient(gw.port, "pub")
    try:
        assert sub.subscribe("data/#", qos=1) == [1]
        for _ in range(3):  # the same topic again and again: answered from the cache
            assert _delivered(pub, sub, "data/t")
        r = _cli("role", "revoke", "writer", "--client", "pub", "--db", str(db))
        assert r.returncode == 0, r.stderr
        # the connected publisher's cached "allowed" goes with the generation
        assert wait_until(lambda: not _delivered(pub, sub, "data/t", 0.3), timeout=5)
        assert not any(_delivered(pub, sub, "data/t", 0.2) for _ in range(3))
    finally:
        sub.disconnect()
        pub.disconnect()


def test_read_answers_are_per_client(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory(config={"acl": [
        {"user": "*", "topic": "c/secret", "action": "subscribe", "access": "deny"},
        *({"user": "*", "topic": f"unrelated/{i}", "action": "publish", "access": "deny"}
          for i in range(8)),
    ]})
    a, b, pub = PahoClient(gw.port), PahoClient(gw.port), PahoClient(gw.port)
    try:
        assert a.subscribe("c/#", qos=1) == [1]
        for _ in range(3):
            assert _delivered(pub, a, "c/open")
            assert not _delivered(pub, a, "c/secret", 0.2)  # the read check, cached
        assert b.subscribe("c/+", qos=1) == [1]  # a new subscription: matched afresh
        assert _delivered(pub, b, "c/open")
        assert not _delivered(pub, b, "c/secret", 0.2)
        assert a.subscribe("unrelated/#", qos=1) == [1]
        for _ in range(2):
            assert not _delivered(pub, a, "unrelated/3", 0.2)  # publish denied, every time
        assert _delivered(pub, a, "unrelated/x")
    finally:
        for c in (a, b, pub):
            c.disconnect()
