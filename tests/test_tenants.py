"""Tenants (issue 18 part 2): derivation, the invisible mountpoint, the guard, and the
isolation property on a real gateway: random clients of three tenants with random filters
(``#``, ``+/#``, ``$share/g/#``, ``$SYS/#``, other tenants' trees), retained messages and
wills never deliver one tenant's message to another tenant's client, and a tenant's client
never sees its mountpoint in a topic."""

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
from rapidmq_edge.mqtt.mountpoint import TenantMount
from rapidmq_edge.mqtt.packets import Will
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
    # its $SYS view is the gateway's to publish, also for wills
    assert scope.allows_publish("acme:alice", "tenants/acme/x")
    assert not scope.allows_publish("acme:alice", "tenants/acme/$SYS/broker/x")
    assert not scope.allows_publish("acme:alice", "tenants/bolt/x")
    assert TenantScope("certificate", ".").tenant_of("acme.dev-1") == "acme"
    # the users file's tenant attribute, kept when the password changes
    path = tmp_path / "users.toml"
    add_user(path, "alice", "pw", tenant="acme")
    add_user(path, "alice", "pw2")
    db = UserDB.load(path)
    attr = TenantScope("user_attribute", attributes=lambda: db.tenants)
    assert attr.tenant_of("alice") == "acme" and attr.tenant_of("bob") is None


def test_tenant_mount_rewrites() -> None:
    m = TenantMount("tenants/acme/")
    assert m.inbound("sensors/t") == "tenants/acme/sensors/t"
    assert m.outbound("tenants/acme/sensors/t") == "sensors/t"
    for foreign in ("tenants/bolt/x", "tenants/acme", "tenants/acme/", "sensors/t"):
        assert m.outbound(foreign) is None, foreign
    assert m.filter("#") == "tenants/acme/#" and m.filter("+/#") == "tenants/acme/+/#"
    assert m.filter("$share/g/#") == "$share/g/tenants/acme/#"
    assert m.filter("$SYS/#") == "tenants/acme/$SYS/#"
    for invalid in ("", "a/#/b", "$share/g", "a+"):
        assert m.filter(invalid) == invalid  # refused as invalid, not mounted
    assert m.unfilter("$share/g/tenants/acme/a/+") == "a/+" and m.unfilter("x/#") is None
    # [MQTT-4.7.2-1] as the client wrote its filters: "#" does not reach $SYS
    assert not m.matched_by("$SYS/broker/x", ["tenants/acme/#", "$share/g/tenants/acme/+/#"])
    assert m.matched_by("$SYS/broker/x", ["tenants/acme/#", "tenants/acme/$SYS/#"])
    props = {"response_topic": "reply/1", "content_type": "t"}
    assert m.inbound_properties(props)["response_topic"] == "tenants/acme/reply/1"
    assert m.outbound_properties(m.inbound_properties(props)) == props
    assert m.outbound_properties({"response_topic": "ops/x"}) == {"response_topic": "ops/x"}
    w = m.will(Will("gone", b"x", 1, True, {"response_topic": "r"}))
    assert (w.topic, w.properties["response_topic"]) == ("tenants/acme/gone", "tenants/acme/r")


def test_tenant_config(tmp_path: Path) -> None:
    c = parse_config({"auth": {"tenant_source": "username_prefix",
                               "tenant_mountpoint": "t/${tenant}/"}}, tmp_path)
    assert c.auth.tenant_source == "username_prefix" and c.auth.tenant_mountpoint == "t/${tenant}/"
    assert not c.auth.tenant_mountpoint_visible and not c.auth.use_cn_as_username
    c = parse_config({"auth": {"tenant_source": "certificate", "use_cn_as_username": True,
                               "tenant_mountpoint_visible": True}}, tmp_path)
    assert c.auth.tenant_source == "certificate" and c.auth.tenant_mountpoint_visible
    with pytest.raises(ConfigError, match="needs use_cn_as_username"):
        parse_config({"auth": {"tenant_source": "certificate"}}, tmp_path)
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


FILTERS = ("#", "+/#", "$share/g/#", "$SYS/#", "tenants/#", "tenants/{other}/#", "a",
           "b/+", "{other}/#", "$share/g/b/#", "+/{other}/+", "$share/g/$SYS/#")
# what a tenant's client publishes (and wills): its own names; $SYS is not its to publish
TOPICS = ("a", "b/c", "tenants/{other}/a", "{other}/x", "$SYS/broker/x")
#: the topics of a tenant's $SYS view (the gateway's $SYS tree has many more)
SYS_VIEW = {"$SYS/broker/clients/connected", "$SYS/broker/sessions",
            "$SYS/broker/subscriptions/count", "$SYS/broker/retained messages/count"}

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


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(clients=st.lists(client_st, min_size=2, max_size=6),
       publishes=st.lists(publish_st, min_size=1, max_size=12))
def test_no_cross_tenant_delivery(tenant_gateway: GatewayProcess, clients: list[dict],
                                  publishes: list[tuple[int, str, bool, int]]) -> None:
    port = tenant_gateway.port
    run = uuid.uuid4().hex[:8]
    # (tenant, its filters as it wrote them, client)
    live: list[tuple[str, tuple[str, ...], PahoClient]] = []
    with_will: list[tuple[str, tuple[str, ...], PahoClient]] = []
    # (receiver tenant, its filters, topic, payload)
    received: list[tuple[str, tuple[str, ...], str, bytes]] = []

    def collect() -> None:
        for tenant, filters, c in live:
            received.extend((tenant, filters, m.topic, m.payload) for m in c.drain())

    operator = PahoClient(port, f"op-{run}", username="operator")  # no tenant: the full tree
    try:
        assert operator.subscribe("tenants/acme/probe", qos=1) == [1]
        # a known-good pair: isolation must not be "nothing is delivered"
        probe_sub = PahoClient(port, f"probe-s-{run}", username="acme:probe")
        probe_pub = PahoClient(port, f"probe-p-{run}", username="acme:probe")
        live += [("acme", ("probe",), probe_sub), ("acme", (), probe_pub)]
        assert probe_sub.subscribe("probe", qos=1) == [1]
        for i, spec in enumerate(clients):
            own = spec["tenant"]
            will = None
            if spec["will"] is not None:
                will = (_fill(spec["will"], own, _other(own)), f"{own}|will".encode(), 1, False)
            c = PahoClient(port, f"c{i}-{run}", username=f"{own}:u{i}", will=will,
                           expect_success=False)
            assert c.connack is not None
            if will is not None and will[0].startswith("$"):
                assert c.connack.reason_code != 0  # its $SYS view is not its to publish
                continue
            assert c.connack.reason_code == 0  # any other will stays in its own tree
            filters = tuple(_fill(f, own, _other(own)) for f in spec["filters"])
            live.append((own, filters, c))
            if will is not None:
                with_will.append((own, filters, c))
            for filt in filters:
                assert c.subscribe(filt, qos=1) == [1], filt  # every filter is its own tree
        for idx, template, retain, qos in publishes:
            tenant, _f, c = live[idx % len(live)]
            topic = _fill(template, tenant, _other(tenant))
            c.publish(topic, f"{tenant}|{run}".encode(), qos=qos, retain=retain)
        probe_pub.publish("probe", b"acme|probe", qos=1)
        assert probe_sub.get(5.0).topic == "probe"  # delivered within the tenant, unmounted
        assert operator.get(5.0).topic == "tenants/acme/probe"  # operators see where it is
        # wills: drop every client with one without DISCONNECT
        collect()
        for entry in with_will:
            entry[2].stop()
            live.remove(entry)
        # late subscribers per tenant: retained messages of every earlier example too
        for t in TENANTS:
            late = PahoClient(port, f"late-{t}-{run}", username=f"{t}:late")
            live.append((t, ("#",), late))
            assert late.subscribe("#", qos=1) == [1]
        time.sleep(0.4)  # let the wills and retained messages arrive
        collect()
    finally:
        operator.disconnect()
        for _tenant, _f, c in live:
            c.disconnect()
    for tenant, filters, topic, payload in received:
        # never the mountpoint, never another tenant's message
        assert not topic.startswith(f"tenants/{tenant}/"), (tenant, topic)
        if topic.startswith("$"):  # only its $SYS view, and only for a $SYS filter
            assert topic in SYS_VIEW, (tenant, topic)
            assert any(f.replace("$share/g/", "").startswith("$SYS/") for f in filters)
        else:
            assert payload.startswith(f"{tenant}|".encode()), (tenant, topic, payload)


def test_will_and_filters_in_visible_mode(gateway_factory: Callable[..., GatewayProcess]
                                          ) -> None:
    """``tenant_mountpoint_visible = true``: clients name the full topics; the guard refuses
    wills and filters outside their mountpoint."""
    gw = gateway_factory({"auth": {"tenant_source": "username_prefix",
                                   "tenant_mountpoint_visible": True}})
    bad = PahoClient(gw.port, "w1", username="acme:w", will=("tenants/bolt/x", b"x", 0, False),
                     expect_success=False)
    assert bad.connack is not None and bad.connack.reason_code in (5, 0x87)  # not authorised
    ok = PahoClient(gw.port, "w2", username="acme:w", will=("tenants/acme/x", b"x", 0, False))
    try:
        for filt in ("#", "+/#", "$share/g/#", "$SYS/#", "tenants/bolt/#"):
            assert ok.subscribe(filt) == [0x80], filt
        assert ok.subscribe("tenants/acme/#", qos=1) == [1]
        ok.publish("tenants/acme/v", b"1", qos=1)
        assert ok.get(5.0).topic == "tenants/acme/v"
    finally:
        ok.disconnect()


def test_mqtt5_aliases_response_topic_and_retained(tenant_gateway: GatewayProcess) -> None:
    """Topic aliases both ways, the Response Topic and retained messages are in the tenant's
    names for its clients and in the broker's for operators."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from tests.mqtt_helpers import MQTTv5

    port = tenant_gateway.port
    run = uuid.uuid4().hex[:6]
    cprops = Properties(PacketTypes.CONNECT)
    cprops.TopicAliasMaximum = 5  # the gateway may alias what it sends this client
    sub = PahoClient(port, f"a5s-{run}", username="acme:s", protocol=MQTTv5, properties=cprops)
    pub = PahoClient(port, f"a5p-{run}", username="acme:p", protocol=MQTTv5)
    op = PahoClient(port, f"a5o-{run}", username="operator", protocol=MQTTv5)
    try:
        assert sub.subscribe(f"al/{run}/#", qos=1) == [1]
        assert op.subscribe(f"tenants/acme/al/{run}/#", qos=1) == [1]
        first = Properties(PacketTypes.PUBLISH)
        first.TopicAlias = 3
        first.ResponseTopic = f"reply/{run}"
        pub.publish(f"al/{run}/t", b"1", qos=1, properties=first)
        again = Properties(PacketTypes.PUBLISH)
        again.TopicAlias = 3  # the alias alone names the topic
        pub.publish("", b"2", qos=1, properties=again)
        got = sub.get_n(2, 5.0)
        # the gateway's own alias names the client's topic (paho leaves it unresolved)
        assert (got[0].topic, got[0].payload) == (f"al/{run}/t", b"1")
        alias = got[0].properties.TopicAlias
        assert (got[1].topic, got[1].properties.TopicAlias, got[1].payload) == ("", alias, b"2")
        assert got[0].properties.ResponseTopic == f"reply/{run}"
        seen = op.get_n(2, 5.0)
        assert {m.topic for m in seen} == {f"tenants/acme/al/{run}/t"}
        assert seen[0].properties.ResponseTopic == f"tenants/acme/reply/{run}"
        pub.publish(f"al/{run}/kept", b"r", qos=1, retain=True)
        sub.drain(0.3)
        late = PahoClient(port, f"a5l-{run}", username="acme:l", protocol=MQTTv5)
        try:
            assert late.subscribe(f"al/{run}/+", qos=1) == [1]
            m = late.get(5.0)
            assert (m.topic, m.payload, m.retain) == (f"al/{run}/kept", b"r", True)
        finally:
            late.disconnect()
        other = PahoClient(port, f"a5b-{run}", username="bolt:x", protocol=MQTTv5)
        try:  # the same name in another tenant is another topic
            assert other.subscribe(f"al/{run}/+", qos=1) == [1]
            assert not other.drain(0.4)
        finally:
            other.disconnect()
    finally:
        for c in (sub, pub, op):
            c.disconnect()


def test_each_tenant_has_its_own_sys_view(tenant_gateway: GatewayProcess) -> None:
    port = tenant_gateway.port
    run = uuid.uuid4().hex[:6]
    a1 = PahoClient(port, f"sa1-{run}", username="acme:s1")
    a2 = PahoClient(port, f"sa2-{run}", username="acme:s2")
    b1 = PahoClient(port, f"sb1-{run}", username="bolt:s1")
    op = PahoClient(port, f"so-{run}", username="operator")
    try:
        assert a1.subscribe("$SYS/#") == [0]  # its own view, in the usual place
        assert b1.subscribe("$SYS/#") == [0]
        assert op.subscribe("tenants/acme/$SYS/#") == [0]  # where the broker keeps it

        def connected(c: PahoClient, want: int) -> bool:
            got = [m for m in c.drain(0.2) if m.topic.endswith("/clients/connected")]
            return any(int(m.payload) >= want for m in got)

        assert wait_until(lambda: connected(a1, 2), timeout=5)
        assert wait_until(lambda: connected(b1, 1), timeout=5)
        seen = a1.drain(1.2)
        assert seen and {m.topic for m in seen} <= SYS_VIEW  # not the gateway's $SYS tree
        assert wait_until(lambda: any(m.topic == "tenants/acme/$SYS/broker/sessions"
                                      for m in op.drain(0.2)), timeout=5)
    finally:
        for c in (a1, a2, b1, op):
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
        a.publish("sensors/t", b"A1", qos=1)  # tenants/acme/sensors/t in the broker
        b.publish("sensors/t", b"B1", qos=1)
        b.publish("other", b"B2", qos=1)  # outside bolt's rule
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
        clients[2].publish("r", b"1", qos=1, retain=True)
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
