"""The TLS client certificate as identity (issue 18 part 2): its subject CN is the user name
(``use_cn_as_username``), the tenant (``tenant_source = "certificate"``) and ``${cert_cn}`` in
role rules. A throwaway CA and client certificates are made in the test (nothing committed);
real paho and mosquitto_pub clients connect over TLS to a real gateway."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rapidmq_edge.config import parse_config
from rapidmq_edge.security.gatekeeper import Gatekeeper
from rapidmq_edge.security.rbac_store import RbacStore, apply_role_file
from rapidmq_edge.security.tokens import add_token
from tests.conftest import free_port, wait_for_port
from tests.mqtt_helpers import MOSQUITTO_PUB, PahoClient, unique
from tests.test_listeners import LOOPBACK, Gw, _cert, _name, _write, paho, start_gateway

pytestmark = pytest.mark.timeout(60)

ROLES = """
[roles.device]
rules = [
  { type = "publishClientSend", topic = "tenants/${tenant}/d/${cert_cn}/#", access = "allow" },
  { type = "subscribePattern", topic = "tenants/${tenant}/#", access = "allow" },
  { type = "publishClientReceive", topic = "tenants/${tenant}/#", access = "allow" },
]
[roles.operator]
rules = [
  { type = "subscribePattern", topic = "tenants/#", access = "allow" },
  { type = "publishClientReceive", topic = "tenants/#", access = "allow" },
]
[groups.devices]
roles = ["device"]
users = ["acme.d1", "acme.d2", "bolt.d1"]
[users.ops]
roles = ["operator"]
"""
CNS = ("acme.d1", "acme.d2", "bolt.d1", "ops")


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]  # CN -> (certificate, key)


def make_certs(d: Path) -> Certs:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("tenant test CA")
    ca = _cert("tenant test CA", ca_key, ca_name, ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pairs: dict[str, tuple[Path, Path]] = {}
    for cn in ("127.0.0.1", *CNS):
        key = ec.generate_private_key(ec.SECP256R1())
        cert: x509.Certificate = _cert(cn, key, ca_name, ca_key, server=cn == "127.0.0.1")
        pairs[cn] = (d / f"{cn}.pem", d / f"{cn}.key")
        _write(pairs[cn][0], cert, key, pairs[cn][1])
    return Certs(d / "ca.pem", pairs.pop("127.0.0.1"), pairs)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tenant-pki"))


@pytest.fixture(scope="module")
def gw(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("gw-cert")
    store = RbacStore(tmp / "rbac.sqlite")
    store.edit(lambda m: apply_role_file(m, ROLES))
    store.close()
    tls = {"cert": str(certs.server[0]), "key": str(certs.server[1]),
           "client_ca": str(certs.ca), "require_client_cert": False}
    https = free_port()
    add_token(tmp / "tokens.toml", "api", "acme.d1")  # the token's user: acme.d1
    g = start_gateway(tmp, ("tls", "wss"), {
        "mqtt": {"tls": tls},
        "http": {"listen": [f"https://{LOOPBACK}:{https}"], "tls": tls,
                 "tokens_file": str(tmp / "tokens.toml")},
        "auth": {"allow_anonymous": False, "use_cn_as_username": True, "rbac": True,
                 "rbac_db": str(tmp / "rbac.sqlite"), "tenant_source": "certificate",
                 "tenant_separator": "."}})
    g.ports["https"] = https
    try:
        assert wait_for_port(LOOPBACK, https, 20), g.proc.log()
        yield g
    finally:
        g.proc.stop()


def device(g: Gw, certs: Certs, cn: str, **kwargs: object) -> PahoClient:
    return paho(g.ports["tls"], ca=certs.ca, cert=certs.clients[cn], client_id=unique(cn),
                **kwargs)  # type: ignore[arg-type]


def test_the_certificate_names_user_tenant_and_cert_cn(gw: Gw, certs: Certs) -> None:
    d1 = device(gw, certs, "acme.d1")
    d2 = device(gw, certs, "acme.d2", username="bolt.d1")  # a claimed name changes nothing
    b1 = device(gw, certs, "bolt.d1")
    ops = device(gw, certs, "ops")
    try:
        for c in (d1, b1):
            assert c.subscribe("#", qos=1) == [1]  # its tenant's tree, invisibly mounted
        assert ops.subscribe("tenants/+/d/#", qos=1) == [1]  # no tenant: the full tree
        d1.publish("d/acme.d1/t", b"own", qos=1)  # ${cert_cn} = acme.d1
        d1.publish("d/acme.d2/t", b"not-own", qos=1)  # another CN's: denied
        d2.publish("d/acme.d2/t", b"d2", qos=1)  # CN acme.d2, tenant acme
        d2.publish("d/bolt.d1/t", b"claimed", qos=1)  # its user name is still its CN
        b1.publish("d/bolt.d1/t", b"bolt", qos=1)
        got = {(m.topic, m.payload) for m in d1.get_n(2, 5.0) + d1.drain(0.4)}
        assert got == {("d/acme.d1/t", b"own"), ("d/acme.d2/t", b"d2")}
        assert {(m.topic, m.payload) for m in b1.get_n(1, 5.0) + b1.drain(0.2)} == {
            ("d/bolt.d1/t", b"bolt")}
        seen = {(m.topic, m.payload) for m in ops.get_n(3, 5.0) + ops.drain(0.2)}
        assert seen == {("tenants/acme/d/acme.d1/t", b"own"),
                        ("tenants/acme/d/acme.d2/t", b"d2"),
                        ("tenants/bolt/d/bolt.d1/t", b"bolt")}
        # mosquitto_pub with acme.d2's certificate: a real second client implementation
        cert, key = certs.clients["acme.d2"]
        res = subprocess.run(
            [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", str(gw.ports["tls"]), "--cafile",
             str(certs.ca), "--cert", str(cert), "--key", str(key), "-t",
             "d/acme.d2/m", "-q", "1", "-m", "mosq"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        m = d1.get(5.0)
        assert (m.topic, m.payload) == ("d/acme.d2/m", b"mosq")
    finally:
        for c in (d1, d2, b1, ops):
            c.disconnect()


def test_https_client_certificate_is_cert_cn(gw: Gw, certs: Certs) -> None:
    """The HTTP API over TLS: the token's user decides the tenant, the client certificate
    the ``${cert_cn}`` of the role rules."""
    import http.client
    import json
    import ssl

    # a token of user acme.d1 (the gateway reloads the tokens file when it changes)
    plain = add_token(Path(gw.proc.config["http"]["tokens_file"]), unique("t"), "acme.d1")

    def publish(cn: str, topic: str) -> int:
        ctx = ssl.create_default_context(cafile=str(certs.ca))
        ctx.load_cert_chain(*map(str, certs.clients[cn]))
        conn = http.client.HTTPSConnection(LOOPBACK, gw.ports["https"], context=ctx,
                                           timeout=5)
        try:
            conn.request("POST", "/api/v1/publish", json.dumps({"topic": topic, "payload": "x"}),
                         {"Authorization": f"Bearer {plain}"})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    ops = device(gw, certs, "ops")
    try:
        assert ops.subscribe("tenants/+/d/#", qos=1) == [1]
        assert publish("acme.d2", "d/acme.d2/h") == 200  # the certificate's CN
        assert publish("acme.d2", "d/acme.d1/h") == 403  # not the token user's
        assert ops.get(5.0).topic == "tenants/acme/d/acme.d2/h"
    finally:
        ops.disconnect()


def test_wss_client_certificate_names_the_client(gw: Gw, certs: Certs) -> None:
    """MQTT over wss://: the certificate reaches the connection through the WebSocket's
    transport (without it use_cn_as_username would refuse the CONNECT)."""
    c = paho(gw.ports["wss"], ws=True, ca=certs.ca, cert=certs.clients["bolt.d1"],
             client_id=unique("wss"))
    try:
        assert c.subscribe("#", qos=1) == [1]
        c.publish("d/bolt.d1/w", b"w", qos=1)  # ${cert_cn} = bolt.d1, tenant bolt
        m = c.get(5.0)
        assert (m.topic, m.payload) == ("d/bolt.d1/w", b"w")
    finally:
        c.disconnect()


def test_without_a_certificate_a_client_is_refused(gw: Gw, certs: Certs) -> None:
    plain = PahoClient(gw.port, unique("plain"), username="acme.d1", password="x",
                       expect_success=False)  # plain TCP: no certificate to name it
    tls = paho(gw.ports["tls"], ca=certs.ca, client_id=unique("nocert"), username="acme.d1",
               connect=False)
    try:
        assert plain.connack is not None and plain.connack.reason_code in (5, 0x87)
        assert tls.connect(expect_success=False).reason_code in (5, 0x87)  # not authorised
    finally:
        plain.disconnect()
        tls.disconnect()


def test_another_certificate_for_a_client_id_rebinds_cert_cn(tmp_path: Path) -> None:
    """``${cert_cn}`` follows the certificate a client id connected with last: the rules
    bound to the previous CN and the cached decisions are dropped (no stale allow)."""
    store = RbacStore(tmp_path / "rbac.sqlite")
    store.edit(lambda m: apply_role_file(m, """
[roles.r]
rules = [{ type = "publishClientSend", topic = "d/${cert_cn}/#", access = "allow" }]
[clients.c1]
roles = ["r"]
"""))
    store.close()
    config = parse_config({"auth": {"rbac": True, "rbac_db": str(tmp_path / "rbac.sqlite")}},
                          tmp_path)
    gk = Gatekeeper.from_config(config)
    assert gk.accept_identity("c1", "u", "one") is None  # no tenant: no mountpoint
    gen = gk.generation
    assert gk.can_publish("u", "c1", "d/one/x") and not gk.can_publish("u", "c1", "d/two/x")
    gk.accept_identity("c1", "u", "two")
    assert gk.generation != gen  # the broker's and connections' caches start anew
    assert gk.can_publish("u", "c1", "d/two/x") and not gk.can_publish("u", "c1", "d/one/x")
    gk.accept_identity("c1", "u", None)  # without a certificate: no ${cert_cn}
    assert not gk.can_publish("u", "c1", "d/two/x") and "c1" not in gk.cert_cns
    assert gk.certificate_login("claimed", "cn") == ("claimed", None)  # not configured
    gk.cn_as_username = True
    assert gk.certificate_login("claimed", "cn") == ("cn", 0)
    assert gk.certificate_login("claimed", None) == ("claimed", 0x87)  # not authorised
