"""The cloud consumer's service files (issue 16): the systemd template unit verifies and names
a stable client id per instance; the Kubernetes Deployment runs N replicas in one group whose
arguments the real ``cloud ingest`` parser accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rapidmq_edge.cli.main import build_parser

from .conftest import _require_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=30)


def test_systemd_template_unit_verifies(tmp_path: Path) -> None:
    _require_binary("systemd-analyze")
    exe = shutil.which("rapidmq-edge", path=str(Path(sys.executable).parent))
    assert exe is not None
    text = (DEPLOY / "systemd" / "rapidmq-cloud-ingest@.service").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert keys["Restart"] == "always" and keys["KillSignal"] == "SIGTERM"
    assert "--client-id rmq-ingest-%H-%i" in text  # stable per instance: session + waiting set
    unit = tmp_path / "rapidmq-cloud-ingest@1.service"
    unit.write_text(text.replace("/opt/rapidmq-edge/bin/rapidmq-edge", exe))
    res = _verify(unit)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    bad = tmp_path / "bad" / "rapidmq-cloud-ingest@1.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("RestartSec=", "RestartSecs="))
    assert "RestartSecs" in _verify(bad).stderr  # the checker reads the keys


def test_kubernetes_deployment_runs_replicas_in_one_group() -> None:
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "cloud-ingest.yaml").read_text())
    assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] >= 2
    container = doc["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    opts = dict(zip(args[2::2], args[3::2], strict=True))
    assert opts["--client-id"] == "$(POD_NAME)" and opts["--group"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    parsed = build_parser().parse_args(
        [a.replace("$(RMQ_OUT)", "postgresql://u@db/x") for a in args])
    assert parsed.out == "postgresql://u@db/x" and parsed.session_expiry == 600
    assert parsed.group == "ingest" and parsed.lease == 60.0


def test_kubernetes_jetstream_replicas_share_one_durable() -> None:
    doc = yaml.safe_load((DEPLOY / "kubernetes" / "cloud-ingest-jetstream.yaml").read_text())
    assert doc["kind"] == "Deployment" and doc["spec"]["replicas"] >= 2
    args = doc["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(
        [a.replace("$(RMQ_OUT)", "postgresql://u@db/x") for a in args])
    assert parsed.source == "jetstream" and parsed.durable == "rapidmq-ingest"
    assert len(parsed.servers.split(",")) == 3 and parsed.out == "postgresql://u@db/x"
