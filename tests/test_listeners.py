"""Listeners of the real gateway: TLS (server and client certificates), WebSocket (ws/wss),
connection limits, publish throttling and graceful shutdown.

Certificates and keys are generated at test time (``cryptography``) into the test's tmp
dir; nothing is committed.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import connect as ws_connect_async
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from .conftest import free_port, wait_for_port
from .gateway_proc import GatewayProcess
from .mqtt_helpers import (
    CONNACK,
    DISCONNECT,
    MOSQUITTO_PUB,
    MosquittoSub,
    MQTTv5,
    MQTTv311,
    PahoClient,
    RawClient,
    build_connect,
    unique,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the gateway does not trust
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.IPv4Address(LOOPBACK)), x509.DNSName("localhost")]),
            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           key_path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("RapidMQ test CA", ca_key, _name("RapidMQ test CA"), ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki = Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
              d / "client.key", d / "rogue.pem", d / "rogue.key")
    skey = ec.generate_private_key(ec.SECP256R1())
    _write(pki.server_cert, _cert("127.0.0.1", skey, ca.subject, ca_key, server=True), skey,
           pki.server_key)
    ckey = ec.generate_private_key(ec.SECP256R1())
    _write(pki.client_cert, _cert("device-1", ckey, ca.subject, ca_key), ckey, pki.client_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rkey = ec.generate_private_key(ec.SECP256R1())
    _write(pki.rogue_cert, _cert("rogue", rkey, _name("rogue CA"), rogue_ca_key), rkey,
           pki.rogue_key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------- gateways


@dataclass
class Gw:
    """A gateway with extra listeners: ``ports[scheme]`` (tcp is ``gw.port``)."""

    proc: GatewayProcess
    ports: dict[str, int]

    @property
    def port(self) -> int:
        return self.proc.port


def start_gateway(tmp: Path, schemes: tuple[str, ...] = (),
                  config: dict[str, Any] | None = None) -> Gw:
    gw = GatewayProcess(tmp, config)
    ports = {s: free_port() for s in schemes}
    extra = [f"{s}://{LOOPBACK}:{p}" + ("/mqtt" if s in ("ws", "wss") else "")
             for s, p in ports.items()]
    gw.config["mqtt"] = dict(gw.config["mqtt"], listen=[*gw.config["mqtt"]["listen"], *extra])
    gw.config_path.write_text(tomli_w.dumps(gw.config))
    gw.start()
    for p in ports.values():
        if not wait_for_port(LOOPBACK, p, 10):
            gw.stop()
            raise RuntimeError(f"listener {p} not up:\n{gw.log()}")
    return Gw(gw, ports)


def tls_config(pki: Pki, require: bool) -> dict[str, Any]:
    return {"mqtt": {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key),
                             "client_ca": str(pki.ca), "require_client_cert": require}}}


@pytest.fixture(scope="module")
def gw(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gw]:
    """tcp + tls + ws + wss; client certificates optional (verified when presented)."""
    g = start_gateway(tmp_path_factory.mktemp("gw-listeners"), ("tls", "ws", "wss"),
                      tls_config(pki, require=False))
    yield g
    g.proc.stop()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Callable[..., Gw]]:
    started: list[Gw] = []

    def start(schemes: tuple[str, ...] = (), config: dict[str, Any] | None = None) -> Gw:
        sub = tmp_path / f"gw{len(started)}"
        sub.mkdir()
        g = start_gateway(sub, schemes, config)
        started.append(g)
        return g

    yield start
    for g in reversed(started):
        g.proc.stop()


# --------------------------------------------------------------------------- clients


def paho(port: int, *, protocol: int = MQTTv311, ws: bool = False, ca: Path | None = None,
         cert: tuple[Path, Path] | None = None, connect: bool = True,
         **kwargs: Any) -> PahoClient:
    """A PahoClient over TCP/TLS/WebSocket (``ca`` set: TLS verifying the server)."""
    c = PahoClient(port, protocol=protocol, connect=False, **kwargs)
    if ws:
        c.client.transport = "websockets"
        c.client.ws_set_options(path="/mqtt")
    if ca is not None:
        certfile, keyfile = (str(cert[0]), str(cert[1])) if cert else (None, None)
        c.client.tls_set(ca_certs=str(ca), certfile=certfile, keyfile=keyfile,
                         cert_reqs=ssl.CERT_REQUIRED)
    if connect:
        c.connect()
    return c


def round_trip(a: PahoClient, b: PahoClient) -> None:
    """a -> b and b -> a, QoS 1, through the broker."""
    topic = unique("rt")
    assert a.subscribe(f"{topic}/to-a", qos=1) == [1]
    assert b.subscribe(f"{topic}/to-b", qos=1) == [1]
    a.publish(f"{topic}/to-b", b"from-a", qos=1)
    b.publish(f"{topic}/to-a", b"from-b", qos=1)
    assert b.get().payload == b"from-a"
    assert a.get().payload == b"from-b"


def tls_socket(port: int, pki: Pki, cert: tuple[Path, Path] | None = None,
               max_version: ssl.TLSVersion | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if max_version is not None:
        ctx.maximum_version = max_version
    raw = socket.create_connection((LOOPBACK, port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=LOOPBACK)


def mqtt_over(sock: socket.socket | ssl.SSLSocket, client_id: str) -> bytes:
    """Send CONNECT (3.1.1) and return the first 4 bytes back (b"" when closed)."""
    sock.sendall(build_connect(client_id))
    data = b""
    while len(data) < 4:
        chunk = sock.recv(4 - len(data))
        if not chunk:
            break
        data += chunk
    return data


CONNACK_OK = b"\x20\x02\x00\x00"


# --------------------------------------------------------------------------- TLS


def test_tls_paho_round_trip_with_tcp_client(gw: Gw, pki: Pki) -> None:
    with paho(gw.ports["tls"], ca=pki.ca) as tls, PahoClient(gw.port) as tcp:
        round_trip(tls, tcp)


def test_tls13_is_negotiated_and_tls12_still_accepted(gw: Gw, pki: Pki) -> None:
    with tls_socket(gw.ports["tls"], pki) as s:
        assert s.version() == "TLSv1.3"
        assert mqtt_over(s, unique("tls13")) == CONNACK_OK
    with tls_socket(gw.ports["tls"], pki, max_version=ssl.TLSVersion.TLSv1_2) as s:
        assert s.version() == "TLSv1.2"
        assert mqtt_over(s, unique("tls12")) == CONNACK_OK


def test_tls_server_certificate_is_verified_by_clients(gw: Gw, pki: Pki) -> None:
    ctx = ssl.create_default_context()  # system CAs only: the test CA is unknown
    with socket.create_connection((LOOPBACK, gw.ports["tls"]), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ctx.wrap_socket(raw, server_hostname=LOOPBACK)


def test_optional_client_certificate_is_accepted_when_valid(gw: Gw, pki: Pki) -> None:
    with tls_socket(gw.ports["tls"], pki, (pki.client_cert, pki.client_key)) as s:
        assert mqtt_over(s, unique("with-cert")) == CONNACK_OK


def _refused_by_tls(port: int, pki: Pki, cert: tuple[Path, Path] | None) -> bool:
    """True when the TLS handshake (or, with TLS 1.3, the first read after it) fails."""
    try:
        with tls_socket(port, pki, cert) as s:
            return mqtt_over(s, unique("nocert")) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_required_client_certificate(gateways: Callable[..., Gw], pki: Pki) -> None:
    g = gateways(("tls",), tls_config(pki, require=True))
    port = g.ports["tls"]
    assert _refused_by_tls(port, pki, None), "a client without certificate got in"
    assert _refused_by_tls(port, pki, (pki.rogue_cert, pki.rogue_key)), \
        "a certificate from an untrusted CA got in"
    with tls_socket(port, pki, (pki.client_cert, pki.client_key)) as s:
        assert s.version() == "TLSv1.3"
        assert mqtt_over(s, unique("cert")) == CONNACK_OK
    with paho(port, ca=pki.ca, cert=(pki.client_cert, pki.client_key)) as a, \
            PahoClient(g.port) as b:
        round_trip(a, b)
    # mosquitto_pub: without a client certificate it fails, with one it delivers
    topic = unique("mq-tls")
    base = [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", str(port), "--cafile", str(pki.ca),
            "-t", topic, "-q", "1", "-m", "hello"]
    res = subprocess.run(base, capture_output=True, text=True, timeout=10,
                         stdin=subprocess.DEVNULL)
    assert res.returncode != 0
    with PahoClient(g.port) as sub:
        sub.subscribe(topic, qos=1)
        res = subprocess.run(base + ["--cert", str(pki.client_cert), "--key",
                                     str(pki.client_key)],
                             capture_output=True, text=True, timeout=10,
                             stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert sub.get().payload == b"hello"


def test_mosquitto_clients_over_tls(gw: Gw, pki: Pki) -> None:
    topic = unique("mq-tls")
    port = str(gw.ports["tls"])
    tls_args = ["--cafile", str(pki.ca)]
    with MosquittoSub(gw.ports["tls"], topic, count=1, qos=1, extra=tls_args) as sub:
        sub.ready()
        res = subprocess.run(
            [MOSQUITTO_PUB, "-h", LOOPBACK, "-p", port, *tls_args, "-t", topic, "-q", "1",
             "-m", "over-tls"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert sub.wait() == [f"{topic} over-tls"]


# --------------------------------------------------------------------------- WebSocket


@pytest.mark.parametrize("version", [MQTTv311, MQTTv5], ids=["v311", "v5"])
def test_websocket_paho_round_trip_with_tcp_client(gw: Gw, version: int) -> None:
    with paho(gw.ports["ws"], protocol=version, ws=True) as ws, \
            PahoClient(gw.port, protocol=version) as tcp:
        round_trip(ws, tcp)


def test_websocket_subprotocol_mqtt_is_negotiated(gw: Gw) -> None:
    url = f"ws://{LOOPBACK}:{gw.ports['ws']}/mqtt"
    with ws_connect(url, subprotocols=["mqtt"], open_timeout=5, close_timeout=2) as ws:
        assert ws.subprotocol == "mqtt"
        ws.send(build_connect(unique("wsraw")))
        assert ws.recv(timeout=5) == CONNACK_OK
    # a client that offers no "mqtt" subprotocol is refused in the handshake
    with pytest.raises(InvalidStatus) as info:
        ws_connect(url, open_timeout=5).close()
    assert info.value.response.status_code == 400


def test_websocket_wrong_path_is_refused(gw: Gw) -> None:
    url = f"ws://{LOOPBACK}:{gw.ports['ws']}/not-mqtt"
    with pytest.raises(InvalidStatus) as info:
        ws_connect(url, subprotocols=["mqtt"], open_timeout=5).close()
    assert info.value.response.status_code == 404
    c = PahoClient(gw.ports["ws"], connect=False)
    c.client.transport = "websockets"
    c.client.ws_set_options(path="/wrong")
    with pytest.raises(AssertionError, match="no CONNACK"):
        c.connect(timeout=1)
    c.stop()


def test_wss_round_trip(gw: Gw, pki: Pki) -> None:
    with paho(gw.ports["wss"], protocol=MQTTv5, ws=True, ca=pki.ca) as wss, \
            PahoClient(gw.port) as tcp:
        round_trip(wss, tcp)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    url = f"wss://{LOOPBACK}:{gw.ports['wss']}/mqtt"
    # websockets' asyncio client, not its sync one: the sync client reads the TLS socket in a
    # thread while its caller writes to it, which CPython < 3.13.6 does not make safe; about
    # 1 in 6,000 of its requests never reached the server, the gateway or a plain websockets
    # one alike (this test's rare failure; the asyncio client: 0 in 32,000)

    async def raw() -> tuple[str | None, bytes | str]:
        async with ws_connect_async(url, subprotocols=[Subprotocol("mqtt")], ssl=ctx,
                                    open_timeout=5) as ws:
            await ws.send(build_connect(unique("wssraw")))
            return ws.subprotocol, await asyncio.wait_for(ws.recv(), 5)

    assert asyncio.run(raw()) == ("mqtt", CONNACK_OK)


# --------------------------------------------------------------------------- limits


def test_max_connections(gateways: Callable[..., Gw]) -> None:
    g = gateways(config={"mqtt": {"max_connections": 3}})
    clients = [PahoClient(g.port) for _ in range(3)]
    try:
        with RawClient(g.port) as raw:  # 3.1.1: "server unavailable"
            assert raw.connect(unique("4th")) == (False, 3)
            assert raw.wait_closed(2)
        with RawClient(g.port, version=5) as raw:  # 5.0: 0x97 quota exceeded
            assert raw.connect(unique("4th-v5")) == (False, 0x97)
            assert raw.wait_closed(2)
        round_trip(clients[0], clients[1])
        round_trip(clients[2], clients[0])
        clients.pop().disconnect()  # a slot frees up
        assert wait_until(lambda: _connack_code(g.port) == 0, timeout=5)
    finally:
        for c in clients:
            c.disconnect()


def _connack_code(port: int) -> int:
    with RawClient(port) as raw:
        code = raw.connect(unique("probe"))[1]
        raw.disconnect()
        return code


def test_connect_rate_per_ip_refuses_a_burst(gateways: Callable[..., Gw]) -> None:
    rate = 3.0
    g = gateways(config={"mqtt": {"connect_rate": rate}})
    time.sleep(1.2)  # the readiness probe used a token: let the bucket refill
    accepted = refused = 0
    start = time.monotonic()
    raws: list[RawClient] = []
    try:
        for i in range(10):
            raw = RawClient(g.port, timeout=3)
            raws.append(raw)
            raw.send(build_connect(unique(f"burst{i}")))
            p = raw.expect(CONNACK, 3)  # a refusal is answered too, not just closed
            if p.body[1] == 0:
                accepted += 1
            else:
                assert p.body[1] == 3, p.body  # 3.1.1: server unavailable
                assert raw.wait_closed(2)
                raw.close()
                refused += 1
        elapsed = time.monotonic() - start
        assert accepted >= 1
        assert accepted <= rate + int(elapsed * rate) + 1, (accepted, elapsed)
        assert refused >= 5, (accepted, refused)
        # the accepted ones keep working
        for raw in raws:
            if not raw.closed:
                raw.pingreq()
                assert raw.recv_packet(3).type == 13  # PINGRESP
    finally:
        for raw in raws:
            raw.close()
    time.sleep(1.0 / rate + 0.1)
    assert _connack_code(g.port) == 0  # tokens come back


def test_connect_rate_exceeded_is_answered_with_connack(gateways: Callable[..., Gw]) -> None:
    """Over ``mqtt.connect_rate`` the CONNECT is read and refused with a CONNACK (5.0:
    0x9F connection rate exceeded; 3.1.1: 3, server unavailable), then closed."""
    g = gateways(config={"mqtt": {"connect_rate": 0.5}})
    time.sleep(2.2)  # the readiness probe used the only token: let it come back
    first = PahoClient(g.port, protocol=MQTTv5)
    try:
        refused = PahoClient(g.port, protocol=MQTTv5, expect_success=False)
        assert refused.connack is not None and refused.connack.reason_code == 0x9F
        with RawClient(g.port) as raw:
            assert raw.connect(unique("rate-v311")) == (False, 3)
            assert raw.wait_closed(2)
        assert first.is_connected
    finally:
        first.disconnect()


def test_publish_rate_throttles_one_client_not_another(gateways: Callable[..., Gw]) -> None:
    g = gateways(config={"mqtt": {"publish_rate": 20.0, "publish_burst": 5}})
    topic = unique("rate")
    with PahoClient(g.port) as sub, PahoClient(g.port) as fast, PahoClient(g.port) as slow:
        sub.subscribe(f"{topic}/#", qos=1)
        done: dict[str, float] = {}

        def flood() -> None:
            t0 = time.monotonic()
            infos = [slow.publish(f"{topic}/slow", str(i).encode(), qos=1, wait=False)
                     for i in range(50)]
            for info in infos:
                info.wait_for_publish(15)
            done["slow"] = time.monotonic() - t0
            done["acked"] = sum(info.is_published() for info in infos)

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(0.5)  # the flooding client is being throttled now
        t0 = time.monotonic()
        for i in range(5):  # within the other client's own burst
            fast.publish(f"{topic}/fast", str(i).encode(), qos=1)
        fast_time = time.monotonic() - t0
        assert "slow" not in done, "the flood was not throttled"
        t.join(20)
        assert not t.is_alive()
        assert done["acked"] == 50
        assert done["slow"] >= 1.9, f"50 messages at 20/s burst 5 took {done['slow']:.2f} s"
        assert fast_time < 0.5, f"an unthrottled client waited {fast_time:.2f} s"
        got = sub.get_n(55, timeout=10)
        assert sorted(m.topic for m in got).count(f"{topic}/fast") == 5


# --------------------------------------------------------------------------- shutdown


def test_sigterm_sends_disconnect_0x8b_to_mqtt5_clients(gateways: Callable[..., Gw]) -> None:
    g = gateways()
    v5 = RawClient(g.port, version=5)
    v3 = RawClient(g.port)
    try:
        assert v5.connect(unique("v5-shutdown"))[1] == 0
        assert v3.connect(unique("v3-shutdown"))[1] == 0
        assert g.proc.proc is not None
        g.proc.proc.terminate()  # SIGTERM
        p = v5.expect(DISCONNECT, 5)
        assert p.body[:1] == b"\x8b", p.body
        assert v5.wait_closed(5)
        assert v3.wait_closed(5)  # 3.1.1 has no server DISCONNECT: just closed
        assert g.proc.proc.wait(10) == 0
    finally:
        v5.close()
        v3.close()

