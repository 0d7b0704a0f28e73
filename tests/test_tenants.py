"""Tenants (issue 18 part 2): derivation, the mountpoint guard, and the isolation property on
a real gateway: random clients of three tenants with random filters (``#``, ``+/#``,
``$share/g/#``, ``$SYS/#``, other tenants' trees), retained messages and wills never deliver
one tenant's message to another tenant's client."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.security.tenants import TenantScope
from rapidmq_edge.security.users import UserDB, add_user
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, wait_until

TENANTS = ("acme", "bolt", "cobra")


def test_tenant_derivation_and_guard(tmp_path: Path) -> None:
    scope = TenantScope("username_prefix")
    assert scope.tenant_of("acme:alice") == "acme"
    assert scope.tenant_of("alice") is None and scope.tenant_of(None) is None
    assert scope.tenant_of("a/b:x") is None  # not one topic level: no tenant, no mount
    assert scope.allows_topic("acme:alice", "tenants/acme/x")
    assert not scope.allows_topic("acme:alice", "tenants/bolt/x")
    assert not scope.allows_topic("acme:alice", "tenants/acme")
    for bad in ("#", "+/#", "$share/g/#", "$SYS/#", "tenants/+/x", "tenants/#"):
        assert not scope.allows_filter("acme:alice", bad), bad
    assert scope.allows_filter("acme:alice", "$share/g/tenants/acme/#")
    assert scope.allows_filter("alice", "#")  # no tenant: left to the rules
    # the users file's tenant attribute, kept when the password changes
    path = tmp_path / "users.toml"
    add_user(path, "alice", "pw", tenant="acme")
    add_user(path, "alice", "pw2")
    db = UserDB.load(path)
    attr = TenantScope("user_attribute", attributes=lambda: db.tenants)
    assert attr.tenant_of("alice") == "acme" and attr.tenant_of("bob") is None


def test_tenant_config(tmp_path: Path) -> None:
    c = parse_config({"auth": {"tenant_source": "username_prefix",
                               "tenant_mountpoint": "t/${tenant}/"}}, tmp_path)
    assert c.auth.tenant_source == "username_prefix" and c.auth.tenant_mountpoint == "t/${tenant}/"
    for bad in ({"tenant_source": "cert"}, {"tenant_mountpoint": "t/x/"},
                {"tenant_mountpoint": "t/${tenant}"}, {"tenant_mountpoint": "+/${tenant}/"},
                {"tenant_separator": "/"}):
        with pytest.raises(ConfigError):
            parse_config({"auth": bad}, tmp_path)


@pytest.fixture(scope="module")
def tenant_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("tenants")
    gw = GatewayProcess(tmp, {"auth": {"allow_anonymous": True,
                                       "tenant_source": "username_prefix"}}).start()
    try:
        yield gw
    finally:
        gw.stop()


FILTERS = ("#", "+/#", "$share/g/#", "$SYS/#", "tenants/#", "tenants/+/#", "{own}/#",
           "tenants/{own}/#", "tenants/{other}/#", "$share/g/tenants/{own}/#",
           "$share/g/tenants/{other}/#", "tenants/{own}/+", "+/{own}/+")
TOPICS = ("tenants/{own}/a", "tenants/{own}/b/c", "tenants/{other}/a", "a/b", "{own}/x")

client_st = st.fixed_dictionaries({
    "tenant": st.sampled_from(TENANTS),
    "filters": st.lists(st.sampled_from(FILTERS), min_size=1, max_size=3),
    "will": st.none() | st.sampled_from(TOPICS),
})
publish_st = st.tuples(st.integers(0, 5), st.sampled_from(TOPICS), st.booleans(),
                       st.integers(0, 1))


def _fill(template: str, own: str, other: str) -> str:
    return template.replace("{own}", own).replace("{other}", other)


def _other(tenant: str) -> str:
    return TENANTS[(TENANTS.index(tenant) + 1) % len(TENANTS)]


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(clients=st.lists(client_st, min_size=2, max_size=6),
       publishes=st.lists(publish_st, min_size=1, max_size=12))
def test_no_cross_tenant_delivery(tenant_gateway: GatewayProcess, clients: list[dict],
                                  publishes: list[tuple[int, str, bool, int]]) -> None:
    port = tenant_gateway.port
    run = uuid.uuid4().hex[:8]
    live: list[tuple[str, PahoClient]] = []  # (tenant, client)
    with_will: list[tuple[str, PahoClient]] = []
    received: list[tuple[str, str, bytes]] = []  # (receiver tenant, topic, payload)

    def collect() -> None:
        for tenant, c in live:
            received.extend((tenant, m.topic, m.payload) for m in c.drain())

    try:
        # a known-good pair: isolation must not be "nothing is delivered"
        probe_sub = PahoClient(port, f"probe-s-{run}", username="acme:probe")
        probe_pub = PahoClient(port, f"probe-p-{run}", username="acme:probe")
        live += [("acme", probe_sub), ("acme", probe_pub)]
        assert probe_sub.subscribe("tenants/acme/probe", qos=1) == [1]
        for i, spec in enumerate(clients):
            own = spec["tenant"]
            will = None
            if spec["will"] is not None:
                will = (_fill(spec["will"], own, _other(own)), f"{own}|will".encode(), 1, False)
            c = PahoClient(port, f"c{i}-{run}", username=f"{own}:u{i}", will=will,
                           expect_success=False)
            assert c.connack is not None
            if will is not None and not will[0].startswith(f"tenants/{own}/"):
                assert c.connack.reason_code != 0  # a will outside its tenant is refused
                continue
            assert c.connack.reason_code == 0
            live.append((own, c))
            if will is not None:
                with_will.append((own, c))
            for f in spec["filters"]:
                filt = _fill(f, own, _other(own))
                codes = c.subscribe(filt, qos=1)
                assert (codes == [1]) == filt.replace("$share/g/", "").startswith(
                    f"tenants/{own}/"), (filt, codes)
        for idx, template, retain, qos in publishes:
            tenant, c = live[idx % len(live)]
            topic = _fill(template, tenant, _other(tenant))
            c.publish(topic, f"{tenant}|{run}".encode(), qos=qos, retain=retain)
        probe_pub.publish("tenants/acme/probe", b"acme|probe", qos=1)
        probe_sub.get(5.0)  # delivered within the tenant
        # wills: drop every client with one without DISCONNECT
        collect()
        for tenant, c in with_will:
            c.stop()
            live.remove((tenant, c))
        # late subscribers per tenant: retained messages of every earlier example too
        for t in TENANTS:
            late = PahoClient(port, f"late-{t}-{run}", username=f"{t}:late")
            live.append((t, late))
            late.subscribe(f"tenants/{t}/#", qos=1)
            late.subscribe("#", qos=1)  # refused: no foreign retained messages either
        time.sleep(0.5)  # let the wills and retained messages arrive
        collect()
    finally:
        for _tenant, c in live:
            c.disconnect()
    # every message is the receiver's tenant's: published by one of its clients, or the
    # gateway's $SYS view of that tenant
    cross = [(t, topic, p) for t, topic, p in received if not p.startswith(f"{t}|".encode())
             and not topic.startswith(f"tenants/{t}/$SYS/broker/")]
    assert not cross, cross
    assert all(topic.startswith(f"tenants/{t}/") for t, topic, _p in received)


def test_will_outside_the_tenant_is_refused(gateway_factory: Callable[..., GatewayProcess]) -> None:
    gw = gateway_factory({"auth": {"tenant_source": "username_prefix"}})
    bad = PahoClient(gw.port, "w1", username="acme:w", will=("tenants/bolt/x", b"x", 0, False),
                     expect_success=False)
    assert bad.connack is not None and bad.connack.reason_code in (5, 0x87)  # not authorised
    ok = PahoClient(gw.port, "w2", username="acme:w", will=("tenants/acme/x", b"x", 0, False))
    ok.disconnect()


def test_each_tenant_has_its_own_sys_view(tenant_gateway: GatewayProcess) -> None:
    port = tenant_gateway.port
    run = uuid.uuid4().hex[:6]
    a1 = PahoClient(port, f"sa1-{run}", username="acme:s1")
    a2 = PahoClient(port, f"sa2-{run}", username="acme:s2")
    b1 = PahoClient(port, f"sb1-{run}", username="bolt:s1")
    try:
        assert a1.subscribe("$SYS/#") == [0x80]  # the gateway-wide view is not theirs
        assert a1.subscribe("tenants/acme/$SYS/#") == [0]
        assert b1.subscribe("tenants/bolt/$SYS/#") == [0]

        def connected(c: PahoClient, want: int) -> bool:
            got = [m for m in c.drain(0.2) if m.topic.endswith("/clients/connected")]
            return any(int(m.payload) >= want for m in got)

        assert wait_until(lambda: connected(a1, 2), timeout=5)
        assert wait_until(lambda: connected(b1, 1), timeout=5)
        seen = a1.drain(1.2)
        assert seen and all(m.topic.startswith("tenants/acme/$SYS/broker/") for m in seen)
    finally:
        for c in (a1, a2, b1):
            c.disconnect()


def test_tenant_forward_rules(mosquitto: Any, gateway_factory: Callable[..., GatewayProcess]
                              ) -> None:
    """A tenant's [[forward]] rule forwards only its own topics, its mountpoint replaced by
    its upstream prefix (the tenant as a level, or {tenant})."""
    gw = gateway_factory({
        "auth": {"tenant_source": "username_prefix"},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://127.0.0.1:{mosquitto.port}"]}],
        "forward": [{"filter": "#", "upstream": "cloud", "tenant": "acme"},
                    {"filter": "sensors/#", "upstream": "cloud", "tenant": "bolt",
                     "topic_prefix": "cust/{tenant}/"}],
    })
    cloud = PahoClient(mosquitto.port, "cloud-sub")
    cloud.subscribe("#", qos=1)
    a = PahoClient(gw.port, "fa", username="acme:a")
    b = PahoClient(gw.port, "fb", username="bolt:b")
    op = PahoClient(gw.port, "op", username="operator")  # no tenant
    try:
        a.publish("tenants/acme/sensors/t", b"A1", qos=1)
        b.publish("tenants/bolt/sensors/t", b"B1", qos=1)
        b.publish("tenants/bolt/other", b"B2", qos=1)  # outside bolt's rule
        op.publish("plain/x", b"P1", qos=1)  # no rule covers it
        def forwarded() -> set[tuple[str, bytes]]:
            return {(m.topic, m.payload) for m in cloud.drain()
                    if not m.topic.endswith("/_heartbeat")}  # the uplink's own

        got: set[tuple[str, bytes]] = set()

        def two() -> bool:
            got.update(forwarded())
            return len(got) >= 2

        assert wait_until(two, timeout=10), got
        time.sleep(0.8)  # anything else would have arrived by now
        got |= forwarded()
        assert got == {("edge/test-gw/acme/sensors/t", b"A1"), ("cust/bolt/sensors/t", b"B1")}
    finally:
        for c in (cloud, a, b, op):
            c.disconnect()


def test_tenant_forward_rule_config(tmp_path: Path) -> None:
    c = parse_config({"upstream": [{"name": "u", "urls": ["mqtt://127.0.0.1:1"]}],
                      "forward": [{"filter": "x/#", "upstream": "u", "tenant": "acme"}]},
                     tmp_path)
    assert c.forwarding.forward[0].filter == "tenants/acme/x/#"
    for bad in ({"tenant": "a/b"}, {"topic_prefix": "t/{tenant}/"}):
        with pytest.raises(ConfigError):
            parse_config({"upstream": [{"name": "u", "urls": ["mqtt://127.0.0.1:1"]}],
                          "forward": [{"filter": "x/#", "upstream": "u", **bad}]}, tmp_path)


def test_tenant_metrics_labels(gateway_factory: Callable[..., GatewayProcess]) -> None:
    import urllib.request

    from tests.conftest import free_port, wait_for_port

    mport = free_port()
    gw = gateway_factory({"auth": {"tenant_source": "username_prefix"},
                          "metrics": {"listen": [f"http://127.0.0.1:{mport}"], "auth": False}})
    assert wait_for_port("127.0.0.1", mport)
    clients = [PahoClient(gw.port, f"m{i}", username=u)
               for i, u in enumerate(("acme:a", "acme:b", "bolt:c", "operator"))]
    try:
        clients[2].publish("tenants/bolt/r", b"1", qos=1, retain=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'rapidmq_tenant_clients_connected{tenant="acme"} 2.0' in text
        assert 'rapidmq_tenant_clients_connected{tenant="bolt"} 1.0' in text
        assert 'rapidmq_tenant_retained_messages{tenant="bolt"} 1.0' in text
        assert 'tenant="operator"' not in text  # no tenant: no series
    finally:
        for c in clients:
            c.disconnect()


def test_user_add_tenant_on_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "users.toml"

    def add(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rapidmq_edge", "user", "add", *args,
                               "--password-stdin", "--users-file", str(path)], input="pw\n",
                              capture_output=True, text=True, timeout=30)

    assert add("alice", "--tenant", "acme").returncode == 0
    assert add("alice").returncode == 0  # a new password keeps the tenant
    bad = add("bob", "--tenant", "a/b")
    assert bad.returncode == 2 and "invalid tenant" in bad.stderr
    assert UserDB.load(path).tenants == {"alice": "acme"}
