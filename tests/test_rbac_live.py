"""RBAC in a running gateway: roles decide, [[acl]] still works, edits apply live (a revoked
role stops an existing subscription's deliveries) and refused edits change nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from rapidmq_edge.security.rbac import Role, parse_rule
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, unique, wait_until


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=30)


def _delivered(pub: PahoClient, sub: PahoClient, topic: str, wait: float = 0.4) -> bool:
    """Publish a marker on ``topic``; True when ``sub`` receives it within ``wait`` s."""
    sub.drain()
    marker = unique("m").encode()
    pub.publish(topic, marker, qos=1)
    got = sub.drain(wait)
    return any(m.payload == marker for m in got)


def test_roles_live(tmp_path: Path, gateway_factory: Callable[..., GatewayProcess]) -> None:
    from rapidmq_edge.security.rbac_store import RbacStore

    db = tmp_path / "rbac.sqlite"
    store = RbacStore(db)
    store.edit(lambda m: m.put_role(Role("reader", (
        parse_rule("subscribePattern", "data/#", "allow"),)))
        .put_role(Role("writer", (parse_rule("publishClientSend", "data/#", "allow", qos=[0, 1]),)))
        .grant("client", "sub1", "reader").grant("group", "anonymous", "writer"))
    store.close()
    gw = gateway_factory(config={
        "auth": {"allow_anonymous": True, "rbac": True, "rbac_db": str(db)},
        "acl": [{"user": "*", "topic": "legacy/#", "action": "all", "access": "allow"}],
    })
    sub1 = PahoClient(gw.port, "sub1")
    sub2 = PahoClient(gw.port, "sub2")
    pub = PahoClient(gw.port, "pub")
    try:
        assert sub1.subscribe("data/#", qos=1) == [1]
        assert sub2.subscribe("data/#", qos=1) == [0x80]  # no role: default deny
        assert _delivered(pub, sub1, "data/1")
        # the [[acl]] table keeps working (role config-acl)
        assert sub2.subscribe("legacy/#", qos=1) == [1]
        assert _delivered(pub, sub2, "legacy/x")
        # the QoS qualifier of the writer role: QoS 2 is not allowed
        sub1.drain()
        pub.publish("data/q2", b"two", qos=2)
        sub1.assert_no_message(0.4)

        # live: revoking the reader role stops sub1's existing subscription
        r = _cli("role", "revoke", "reader", "--client", "sub1", "--db", str(db))
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: not _delivered(pub, sub1, "data/2", 0.3), timeout=5)
        assert not any(_delivered(pub, sub1, "data/3", 0.2) for _ in range(3))
        # live: a grant lets sub2 subscribe now
        r = _cli("group", "create", "readers", "--db", str(db))
        r = _cli("group", "add-member", "readers", "--client", "sub2", "--db", str(db))
        assert r.returncode == 0, r.stderr
        r = _cli("group", "add-role", "readers", "reader", "--db", str(db))
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: sub2.subscribe("data/#", qos=1) == [1], timeout=5)
        assert _delivered(pub, sub2, "data/4")

        # refused edits: a bad role file and an unknown role change nothing
        bad = tmp_path / "bad.toml"
        bad.write_text('[groups.readers]\nroles = ["ghost"]\n')
        r = _cli("role", "import", str(bad), "--db", str(db))
        assert r.returncode == 1 and "unknown role: ghost" in r.stderr
        bad.write_text("[roles.x\n")
        r = _cli("role", "import", str(bad), "--db", str(db))
        assert r.returncode == 2 and "not valid TOML" in r.stderr
        assert _delivered(pub, sub2, "data/5")
        assert "RBAC rules generation" in gw.log()
    finally:
        for c in (sub1, sub2, pub):
            c.disconnect()


def test_roles_apply_to_http_tokens(tmp_path: Path,
                                    gateway_factory: Callable[..., GatewayProcess]) -> None:
    """An HTTP token acts as its user: that user's roles (and their qualifiers) decide."""
    from rapidmq_edge.security.rbac_store import RbacStore
    from tests.test_http_api import start_http_gateway

    db = tmp_path / "rbac.sqlite"
    store = RbacStore(db)
    store.edit(lambda m: m.put_role(Role("writer", (
        parse_rule("publishClientSend", "a/#", "allow", retain="false"),)))
        .grant("user", "alice", "writer"))
    store.close()
    api = start_http_gateway(gateway_factory, tmp_path, {"t-alice": "alice", "t-bob": "bob"},
                             extra={"auth": {"rbac": True, "rbac_db": str(db)}})
    alice, bob = api.tokens["t-alice"], api.tokens["t-bob"]
    assert api.publish(alice, topic="a/1", payload="x")[0] == 200
    assert api.publish(alice, topic="b/1", payload="x")[0] == 403  # outside the role
    assert api.publish(alice, topic="a/1", payload="x", retain=True)[0] == 403  # qualifier
    assert api.publish(bob, topic="a/1", payload="x")[0] == 403  # no role: default deny
    r = _cli("user", "add-role", "bob", "writer", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: api.publish(bob, topic="a/2", payload="x")[0] == 200, timeout=5)


def test_roles_apply_to_oscore_devices(tmp_path: Path,
                                       gateway_factory: Callable[..., GatewayProcess]) -> None:
    """A CoAP request over OSCORE acts as the context's device name: its roles decide, and a
    revoked role refuses the next request."""
    from rapidmq_edge.security.rbac_store import RbacStore
    from tests.test_coap import CoapGateway, _oscore_client

    oscore_dir = tmp_path / "oscore"
    added = _cli("oscore", "add", "dev1", "--oscore-dir", str(oscore_dir))
    assert added.returncode == 0, added.stderr
    device = tmp_path / "device-dev1"
    device.mkdir()
    (device / "secret.json").write_text(added.stdout)
    db = tmp_path / "rbac.sqlite"
    store = RbacStore(db)
    store.edit(lambda m: m.put_role(Role("own-tree", (
        parse_rule("publishClientSend", "devices/${username}/#", "allow"),
        parse_rule("subscribePattern", "devices/${username}/#", "allow"))))
        .grant("user", "dev1", "own-tree"))
    store.close()
    g = CoapGateway(gateway_factory, oscore_dir=str(oscore_dir), require_oscore=True,
                    extra={"auth": {"rbac": True, "rbac_db": str(db)}})
    own = g.url("ps/data/devices/dev1/t")
    assert _oscore_client(device, own, "PUT", b"1").startswith("2.01")
    assert _oscore_client(device, g.url("ps/data/devices/dev2/t"), "PUT", b"1").startswith(
        "4.03")
    r = _cli("role", "revoke", "own-tree", "--user", "dev1", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: _oscore_client(device, own, "PUT", b"2").startswith("4.03"),
                      timeout=8, interval=0.3)


def test_unsubscribe_rules(tmp_path: Path, gateway_factory: Callable[..., GatewayProcess]) -> None:
    """An unsubscribePattern deny keeps a subscription (MQTT 5 UNSUBACK 0x87); elsewhere
    unsubscribing is allowed (as dynsec)."""
    from paho.mqtt.client import MQTTv5

    from rapidmq_edge.security.rbac_store import RbacStore

    db = tmp_path / "rbac.sqlite"
    store = RbacStore(db)
    store.edit(lambda m: m.put_role(Role("pinned", (
        parse_rule("subscribePattern", "#", "allow"),
        parse_rule("publishClientSend", "#", "allow"),
        parse_rule("unsubscribePattern", "alarms/#", "deny"))))
        .grant("group", "anonymous", "pinned"))
    store.close()
    gw = gateway_factory({"auth": {"rbac": True, "rbac_db": str(db)}})
    c = PahoClient(gw.port, "pin", protocol=MQTTv5)
    try:
        assert c.subscribe("alarms/#", qos=1) == [1]
        assert c.subscribe("data/#", qos=1) == [1]
        assert c.unsubscribe("alarms/#") == [0x87]
        assert c.unsubscribe("data/#") == [0]
        assert _delivered(c, c, "alarms/fire")  # still subscribed
        assert not _delivered(c, c, "data/x")
    finally:
        c.disconnect()
