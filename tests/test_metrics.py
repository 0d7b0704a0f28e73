"""``/metrics`` of a real gateway subprocess: valid for ``promtool check metrics``, scraped
by a real Prometheus server (queried back through its HTTP API), counters that move with
real MQTT traffic (paho), drops by reason, OpenMetrics on request, and the token required
on its own listener when ``[metrics] auth`` is true."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rapidmq_edge.security.tokens import add_token

from .conftest import LOOPBACK, MosquittoBroker, _require_binary, free_port, wait_for_port
from .gateway_proc import GatewayProcess

pytestmark = pytest.mark.timeout(60)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text)[(name, tuple(sorted(labels.items())))]


def _publish(port: int, items: list[tuple[str, int]], client_id: str = "pub") -> None:
    """Publish ``(topic, qos)`` items with paho and wait for every QoS 1 ack."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv5)
    c.connect(LOOPBACK, port)
    c.loop_start()
    try:
        infos = [c.publish(t, b"x" * 10, qos=q) for t, q in items]
        for info in infos:
            info.wait_for_publish(timeout=5)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def fwd_gateway(gateway_factory: Callable[..., GatewayProcess],
                mosquitto: MosquittoBroker) -> GatewayProcess:
    http = free_port()
    gw = gateway_factory({
        "http": {"listen": [f"http://{LOOPBACK}:{http}"]},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{mosquitto.port}"],
                      "keep_alive": 5}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud", "priority": "normal"}],
        "acl": [{"user": "*", "topic": "denied/#", "action": "publish", "access": "deny"},
                {"user": "*", "topic": "#", "action": "all", "access": "allow"}],
    })
    gw.http_port = http  # type: ignore[attr-defined]
    assert wait_for_port(LOOPBACK, http)
    return gw


def _scrape(gw: GatewayProcess, **headers: str) -> str:
    status, ctype, body = _get(f"http://{LOOPBACK}:{gw.http_port}/metrics",  # type: ignore[attr-defined]
                               headers)
    assert status == 200, body
    return body


def _wait_value(gw: GatewayProcess, want: float, name: str, **labels: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        text = _scrape(gw)
        try:
            if _value(text, name, **labels) == want:
                return text
        except KeyError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} never reached {want}:\n{text}")
        time.sleep(0.1)


def test_metrics_move_with_traffic_and_pass_promtool(fwd_gateway: GatewayProcess) -> None:
    _require_binary("promtool")
    gw = fwd_gateway
    before = _scrape(gw)
    assert _value(before, "rapidmq_messages_received_total", protocol="mqtt", qos="1") == 0
    _publish(gw.port, [("sensors/t", 1)] * 20 + [("sensors/t", 0)] * 5 + [("denied/x", 1)])
    text = _wait_value(gw, 25, "rapidmq_upstream_sent_total", upstream="cloud")
    # the counters moved by exactly the traffic sent
    assert _value(text, "rapidmq_messages_received_total", protocol="mqtt", qos="1") == 20
    assert _value(text, "rapidmq_messages_received_total", protocol="mqtt", qos="0") == 5
    assert _value(text, "rapidmq_messages_dropped_total", path="ingress", reason="acl_denied",
                  **{"class": ""}) == 1
    assert _value(text, "rapidmq_messages_dropped_total", path="local",
                  reason="no_subscribers", **{"class": ""}) == 25
    assert _value(text, "rapidmq_upstream_up", upstream="cloud") == 1
    assert _value(text, "rapidmq_forward_queue_commit_seconds_count") >= 1
    assert _value(text, "rapidmq_received_bytes_total", protocol="mqtt") > 26 * 10
    assert _value(text, "process_open_fds") > 0
    assert _value(text, "rapidmq_build_info", gateway="test-gw", version=_version()) == 1
    # promtool lints a live scrape (names, units, HELP, types)
    check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=20)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # OpenMetrics when the scraper asks for it
    status, ctype, om = _get(f"http://{LOOPBACK}:{gw.http_port}/metrics",  # type: ignore[attr-defined]
                             {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert om.rstrip().endswith("# EOF")
    assert 'rapidmq_messages_received_total{protocol="mqtt",qos="1"} 20' in om


def _version() -> str:
    from rapidmq_edge import __version__

    return __version__


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start a real Prometheus scraping the given ``host:port`` every 0.5 s; yields a
    function starting it and returning its base URL."""
    _require_binary("prometheus")
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str) -> str:
        port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
            "scrape_configs:\n  - job_name: rapidmq\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
        procs.append(subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={conf}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={LOOPBACK}:{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        log.close()
        assert wait_for_port(LOOPBACK, port, timeout=15), (tmp_path / "prometheus.log").read_text()
        return f"http://{LOOPBACK}:{port}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    status, _, body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    if status != 200:
        return []
    data = json.loads(body)
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def test_a_real_prometheus_scrapes_the_counters(fwd_gateway: GatewayProcess,
                                                prometheus: Callable[[str], str]) -> None:
    gw = fwd_gateway
    base = prometheus(f"{LOOPBACK}:{gw.http_port}")  # type: ignore[attr-defined]
    _publish(gw.port, [("sensors/p", 1)] * 7)
    expr = 'rapidmq_messages_received_total{protocol="mqtt",qos="1"}'
    deadline = time.monotonic() + 30
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _query(base, expr)
        if result and float(result[0]["value"][1]) == 7:
            break
        time.sleep(0.3)
    assert result and float(result[0]["value"][1]) == 7, result
    assert result[0]["metric"]["job"] == "rapidmq"
    up = _query(base, "up")
    assert up and up[0]["value"][1] == "1", up  # every scrape parsed


def test_own_listener_requires_a_token(gateway_factory: Callable[..., GatewayProcess],
                                       tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    token = add_token(tokens, "scraper", "prom", role="read")
    mport = free_port()
    gw = gateway_factory({
        "http": {"tokens_file": str(tokens)},
        "metrics": {"listen": [f"http://{LOOPBACK}:{mport}"], "auth": True},
    })
    assert wait_for_port(LOOPBACK, mport)
    url = f"http://{LOOPBACK}:{mport}/metrics"
    status, _, body = _get(url)
    assert status == 401 and "rapidmq" not in body
    assert _get(url, {"Authorization": "Bearer rmq_wrong"})[0] == 401
    status, ctype, body = _get(url, {"Authorization": f"Bearer {token}"})
    assert status == 200 and ctype.startswith("text/plain"), body
    assert "rapidmq_messages_received_total" in body
    # the probes on the same listener never need a token
    assert _get(f"http://{LOOPBACK}:{mport}/livez")[0] == 200
    assert _get(f"http://{LOOPBACK}:{mport}/readyz")[0] == 200
    gw.stop()


def test_the_ota_hook_and_the_loop_lag_histogram() -> None:
    """In process: what the OTA integration's hook returns becomes an info series; the
    loop-lag sampler feeds its histogram."""
    from rapidmq_edge.broker.broker import Broker, BrokerLimits
    from rapidmq_edge.ops.metrics import GatewayMetrics, MetricSources
    from rapidmq_edge.ops.process_stats import LoopLag

    lag = LoopLag()
    m = GatewayMetrics(MetricSources("gw-x", Broker(BrokerLimits()), lag))
    m.sources.ota_components = lambda: [{"component": "priority", "state": "shadow",
                                         "version": "3"}]
    assert lag.on_sample is not None
    lag.on_sample(0.003)
    body, ctype = m.render(None)
    text = body.decode()
    assert ctype.startswith("text/plain")
    assert _value(text, "rapidmq_ota_component_info", component="priority", state="shadow",
                  version="3") == 1
    assert _value(text, "rapidmq_event_loop_lag_seconds_count") == 1
    assert _value(text, "rapidmq_event_loop_lag_seconds_bucket", le="0.005") == 1
    assert _value(text, "rapidmq_event_loop_lag_seconds_bucket", le="0.0025") == 0


def test_intelligence_series_move_with_scored_traffic(
        gateway_factory: Callable[..., GatewayProcess], mosquitto: MosquittoBroker) -> None:
    http = free_port()
    gw = gateway_factory({
        "http": {"listen": [f"http://{LOOPBACK}:{http}"]},
        "upstream": [{"name": "cloud", "urls": [f"mqtt://{LOOPBACK}:{mosquitto.port}"]}],
        "forward": [{"filter": "sensors/#", "upstream": "cloud"}],
        "intelligence": {"enabled": True},
    })
    gw.http_port = http  # type: ignore[attr-defined]
    assert wait_for_port(LOOPBACK, http)
    _publish(gw.port, [("sensors/t", 1)] * 30)
    text = _wait_value(gw, 30, "rapidmq_intelligence_scored_messages_total")
    assert _value(text, "rapidmq_intelligence_inference_seconds_count") >= 1
    models = {k[1]: v for k, v in _samples(text).items()
              if k[0] == "rapidmq_intelligence_model_info"}
    assert {dict(k)["model"] for k in models} == {"priority", "threat", "anomaly"}
    assert _value(text, "rapidmq_intelligence_incidents_open") == 0


def test_coap_and_http_publications_count_under_their_protocol(
        gateway_factory: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    _require_binary("/usr/bin/coap-client-notls")
    http, coap_port = free_port(), free_port()
    tokens = tmp_path / "tokens.toml"
    token = add_token(tokens, "pub", "pub")
    gw = gateway_factory({
        "http": {"listen": [f"http://{LOOPBACK}:{http}"], "tokens_file": str(tokens)},
        "coap": {"listen": [f"udp://{LOOPBACK}:{coap_port}"]},
    })
    gw.http_port = http  # type: ignore[attr-defined]
    assert wait_for_port(LOOPBACK, http)
    url = f"coap://{LOOPBACK}:{coap_port}/ps/data/dev/"
    for i, mode in enumerate(("post", "post", "put")):  # CON: QoS 1
        subprocess.run(["/usr/bin/coap-client-notls", "-B", "5", "-m", mode, "-e", "v",
                        f"{url}{i}"], capture_output=True, timeout=15, check=True)
    subprocess.run(["/usr/bin/coap-client-notls", "-B", "5", "-N", "-m", "post", "-e", "v",
                    f"{url}n"], capture_output=True, timeout=15, check=True)  # NON: QoS 0
    req = urllib.request.Request(
        f"http://{LOOPBACK}:{http}/api/v1/publish", method="POST",
        data=json.dumps({"topic": "dev/h", "payload": "v", "qos": 0}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    text = _wait_value(gw, 1, "rapidmq_messages_received_total", protocol="coap", qos="0")
    assert _value(text, "rapidmq_messages_received_total", protocol="coap", qos="1") == 3
    assert _value(text, "rapidmq_messages_received_total", protocol="http", qos="0") == 1
    assert _value(text, "rapidmq_messages_received_total", protocol="mqtt", qos="0") == 0
    assert _value(text, "rapidmq_messages_received_total", protocol="mqtt", qos="1") == 0
