"""What a gateway imports (issue 17, start RSS): with a configuration that uses neither
``[intelligence]``, ``[ota]``, an HTTP listener nor TLS, a running gateway never imports numpy,
onnxruntime, aiohttp, prometheus_client, cbor2, cryptography or pqcrypto (together ~30 MB of
RSS); with a ``[metrics]`` listener aiohttp and prometheus_client are imported (so the check
can see an import). The gateway runs as ``rapidmq-edge run`` with ``PYTHONPROFILEIMPORTTIME``:
its log names every module it imports over its whole life, start to stop."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import free_port, wait_for_port
from tests.gateway_proc import LOOPBACK, GatewayProcess
from tests.mqtt_helpers import PahoClient

pytestmark = pytest.mark.timeout(40)

#: loaded only by a configuration that uses them
OPTIONAL = {"numpy", "onnxruntime", "aiohttp", "prometheus_client", "cbor2", "cryptography",
            "pqcrypto", "aiocoap"}


def _imported(log: str) -> set[str]:
    """Top-level packages in a ``-X importtime`` trace (``import time: self | cum | name``)."""
    names = {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
             if line.startswith("import time:") and line.count("|") == 2}
    return {n.split(".")[0] for n in names} | {n for n in names if n.startswith("rapidmq")}


def test_mqtt_only_gateway_imports_no_optional_package(
    monkeypatch: pytest.MonkeyPatch, gateway_factory: Callable[..., GatewayProcess],
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    gw = gateway_factory()  # the embedded defaults on a free port, $SYS every second
    sub, pub = PahoClient(gw.port, "sub"), PahoClient(gw.port, "pub")
    try:  # the running paths: $SYS, a QoS 1 round trip, a retained message
        assert sub.subscribe([("$SYS/broker/uptime", 0), ("t/#", 1)]) == [0, 1]
        assert sub.get(timeout=5).topic == "$SYS/broker/uptime"
        pub.publish("t/x", b"m", qos=1, retain=True)
        assert sub.get(timeout=5).payload == b"m"
    finally:
        sub.disconnect()
        pub.disconnect()
    gw.stop()
    imported = _imported(gw.log())
    assert "rapidmq_edge.broker.connection" in imported  # the trace is there
    assert "rapidmq_edge.gateway.process" in imported
    assert imported & OPTIONAL == set(), gw.log()[-2000:]

    mport = free_port()
    metrics = gateway_factory(config={"metrics": {"listen": [f"http://{LOOPBACK}:{mport}"]}})
    assert wait_for_port(LOOPBACK, mport, timeout=10)
    metrics.stop()
    assert {"aiohttp", "prometheus_client"} <= _imported(metrics.log())
