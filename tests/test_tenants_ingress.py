"""Invisible tenant mountpoints beyond MQTT (issue 18 part 2): an HTTP token and an OSCORE
identity with a tenant name topics below its mountpoint without it, as its MQTT clients do;
operators (no tenant) see the broker's full names. One real gateway with MQTT, the HTTP API
and CoAP; real paho, SSE over http.client and aiocoap (OSCORE) clients."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapidmq_edge.security.oscore import provision_device
from rapidmq_edge.security.tokens import add_token
from tests.conftest import free_port, wait_for_port
from tests.gateway_proc import GatewayProcess
from tests.mqtt_helpers import PahoClient, unique
from tests.test_coap import _oscore_client, udp_port, wait_coap
from tests.test_http_api import API, LOOPBACK, Sse

pytestmark = pytest.mark.timeout(90)


class Gw:
    def __init__(self, proc: GatewayProcess, http_port: int, coap_port: int,
                 tokens: dict[str, str], device_dir: Path) -> None:
        self.proc = proc
        self.http_port = http_port
        self.coap_port = coap_port
        self.tokens = tokens
        self.device_dir = device_dir  # the OSCORE device side of "acme:dev1"

    def publish(self, token: str, **fields: object) -> int:
        import http.client

        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=5)
        try:
            conn.request("POST", f"{API}/publish", json.dumps(fields),
                         {"Authorization": f"Bearer {token}",
                          "Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def coap_url(self, path: str) -> str:
        return f"coap://{LOOPBACK}:{self.coap_port}/{path}"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    tmp = tmp_path_factory.mktemp("tenant-ingress")
    tokens_file = tmp / "tokens.toml"
    tokens = {name: add_token(tokens_file, name, user)
              for name, user in (("acme-api", "acme:api"), ("ops", "operator"))}
    device = provision_device(tmp / "oscore", "acme:dev1")
    device_dir = tmp / "device"
    device_dir.mkdir()
    (device_dir / "secret.json").write_text(json.dumps(device))
    http_port, coap_port = free_port(), udp_port()
    proc = GatewayProcess(tmp, {
        "auth": {"tenant_source": "username_prefix"},
        "http": {"listen": [f"http://{LOOPBACK}:{http_port}"], "tokens_file": str(tokens_file)},
        "coap": {"listen": [f"udp://{LOOPBACK}:{coap_port}"], "oscore_dir": str(tmp / "oscore")},
    }).start()
    try:
        assert wait_for_port(LOOPBACK, http_port, 20), proc.log()
        wait_coap(coap_port, gw=proc)
        yield Gw(proc, http_port, coap_port, tokens, device_dir)
    finally:
        proc.stop()


def test_http_token_of_a_tenant(gw: Gw) -> None:
    port = gw.proc.port
    run = unique("h")
    op = PahoClient(port, f"op-{run}", username="operator")
    acme = PahoClient(port, f"acme-{run}", username="acme:m")
    bolt = PahoClient(port, f"bolt-{run}", username="bolt:m")
    sse = Sse(gw.http_port, "#", gw.tokens["acme-api"])  # its tenant's tree
    try:
        assert sse.status == 200
        sse.ready()
        assert op.subscribe(f"tenants/acme/{run}/#", qos=1) == [1]
        assert acme.subscribe(f"{run}/#", qos=1) == [1]
        assert gw.publish(gw.tokens["acme-api"], topic=f"{run}/1", payload="a1",
                          retain=True) == 200
        ev = sse.next_event()
        assert (ev[1]["topic"], ev[1]["payload"]) == (f"{run}/1", "a1")
        assert (op.get(5.0).topic, acme.get(5.0).topic) == (f"tenants/acme/{run}/1", f"{run}/1")
        bolt.publish(f"{run}/2", b"b2", qos=1)  # the same name in another tenant
        assert gw.publish(gw.tokens["acme-api"], topic=f"{run}/3", payload="a3") == 200
        assert sse.next_event()[1]["topic"] == f"{run}/3"  # not bolt's in between
        # its $SYS view is not its to publish; retained messages come back in its names
        assert gw.publish(gw.tokens["acme-api"], topic="$SYS/broker/x", payload="x") == 403
        late = Sse(gw.http_port, f"{run}/+", gw.tokens["acme-api"])
        try:
            late.ready()
            ev = late.next_event()
            assert (ev[1]["topic"], ev[1]["retain"]) == (f"{run}/1", True)
        finally:
            late.close()
        full = Sse(gw.http_port, f"tenants/acme/{run}/+", gw.tokens["ops"])
        try:  # an operator's token: the broker's names
            full.ready()
            assert full.next_event()[1]["topic"] == f"tenants/acme/{run}/1"
        finally:
            full.close()
    finally:
        sse.close()
        for c in (op, acme, bolt):
            c.disconnect()


def test_oscore_identity_of_a_tenant(gw: Gw) -> None:
    port = gw.proc.port
    run = unique("c")
    op = PahoClient(port, f"op-{run}", username="operator")
    acme = PahoClient(port, f"acme-{run}", username="acme:m")
    try:
        assert op.subscribe(f"tenants/acme/{run}/#", qos=1) == [1]
        assert acme.subscribe(f"{run}/#", qos=1) == [1]
        url = gw.coap_url(f"ps/data/{run}/t")
        assert _oscore_client(gw.device_dir, url, "PUT", b"42").startswith("2.01")
        assert (op.get(5.0).topic, acme.get(5.0).topic) == (f"tenants/acme/{run}/t", f"{run}/t")
        assert _oscore_client(gw.device_dir, url, "GET").startswith("2.05 42")
        # the broker's full name is not its name: below its mountpoint there is nothing
        full = gw.coap_url(f"ps/data/tenants/acme/{run}/t")
        assert _oscore_client(gw.device_dir, full, "GET").startswith("4.04")
    finally:
        for c in (op, acme):
            c.disconnect()
