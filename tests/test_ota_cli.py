"""The operator CLI of OTA updates, run as real subprocesses: ``ota keys init`` (modes, never
overwrites), ``ota sign`` (manifest + payload that a gateway's verify accepts, vectors that
the model really gives, encryption to a gateway recipient key), ``ota inspect``; and the
``[ota]`` configuration section as ``check-config`` reports it."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.crypto.keys import RecipientKey
from rapidmq_edge.intelligence.models import ort_session
from rapidmq_edge.ota.manifest import Gate, decrypt_payload, verify_envelope
from rapidmq_edge.ota.trust import TrustAnchors

MODELS = Path(__file__).resolve().parent.parent / "models"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("operator") / "keys"
    res = _cli("ota", "keys", "init", "--out", str(out), "--ed25519")
    assert res.returncode == 0, res.stderr
    return out


def test_keys_init_modes_and_no_overwrite(keys: Path) -> None:
    names = sorted(p.name for p in keys.iterdir())
    assert names == ["operator-ed25519.key", "operator-ed25519.pub",
                     "operator-mldsa65.key", "operator-mldsa65.pub"]
    for p in keys.iterdir():
        want = 0o600 if p.suffix == ".key" else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    res = _cli("ota", "keys", "init", "--out", str(keys))
    assert res.returncode == 1 and "refusing to overwrite" in res.stderr
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before
    assert TrustAnchors.from_files([keys / "operator-mldsa65.pub",
                                    keys / "operator-ed25519.pub"]).keys


def test_sign_then_verify_like_a_gateway(keys: Path, tmp_path: Path) -> None:
    model = MODELS / "threat.onnx"
    res = _cli("ota", "sign", "--key", str(keys / "operator-mldsa65.key"),
               "--key", str(keys / "operator-ed25519.key"), "--component", "threat",
               "--sequence", "12", "--model", str(model), "--class", "line-3",
               "--min-version", "0.1.0", "--chunk-size", "4096", "--gate", "min_messages=300",
               "--gate", "min_agreement=0.98", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    envelope = (tmp_path / "threat-12.manifest").read_bytes()
    payload = (tmp_path / "threat-12.payload").read_bytes()
    assert payload == model.read_bytes()
    trust = TrustAnchors.from_files([keys / "operator-mldsa65.pub",
                                     keys / "operator-ed25519.pub"], require_classical=True)
    m = verify_envelope(envelope, trust, gateway_class="line-3", gateway_version="0.1.0",
                        max_payload_bytes=1 << 26)
    assert (m.component, m.sequence, m.chunk_size, m.chunk_count) == (
        "threat", 12, 4096, -(-len(payload) // 4096))
    assert m.version == json.loads((MODELS / "threat.json").read_text())["version"]
    assert m.gate == Gate(min_messages=300, min_agreement=0.98)
    assert [(t.name, t.shape) for t in m.inputs] == [("features", (None, 18))]
    assert len(m.signers) == 2
    # the vectors are what the shipped model really outputs
    rows = np.asarray(m.vectors.inputs, dtype=np.float32)
    got = ort_session(model).run(None, {"features": rows})[0].tolist()
    assert got == list(m.vectors.labels) and len(got) == 8 and len(set(got)) > 1
    # a sequence is never re-signed into the same files
    again = _cli("ota", "sign", "--key", str(keys / "operator-mldsa65.key"), "--component",
                 "threat", "--sequence", "12", "--model", str(model), "--class", "line-3",
                 "--min-version", "0.1.0", "--out", str(tmp_path))
    assert again.returncode == 1 and "exists" in again.stderr
    assert (tmp_path / "threat-12.manifest").read_bytes() == envelope


def test_sign_encrypted_and_inspect(keys: Path, tmp_path: Path) -> None:
    gateway = RecipientKey.generate()
    pub = tmp_path / "gw-recipient.cose"
    pub.write_bytes(gateway.public().cose())
    model = MODELS / "priority.onnx"
    res = _cli("ota", "sign", "--key", str(keys / "operator-mldsa65.key"), "--component",
               "priority", "--sequence", "3", "--model", str(model), "--class", "default",
               "--min-version", "0.1", "--encrypt-to", str(pub), "--uri",
               "https://models.example/p3", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    payload = (tmp_path / "priority-3.payload").read_bytes()
    assert payload != model.read_bytes()
    man = tmp_path / "priority-3.manifest"
    m = verify_envelope(man.read_bytes(), TrustAnchors.from_files(
        [keys / "operator-mldsa65.pub"]), gateway_class="default", gateway_version="0.1.0",
        max_payload_bytes=1 << 26)
    assert decrypt_payload(m, payload, gateway) == model.read_bytes()

    info = _cli("ota", "inspect", str(man), "--json", "--trust",
                str(keys / "operator-mldsa65.pub"))
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert (doc["component"], doc["sequence"], doc["uri"]) == ("priority", 3,
                                                                "https://models.example/p3")
    assert doc["encryption"]["recipients"] == [gateway.kid.hex()]
    assert doc["verified"].startswith("verified")
    # another operator's key: refused, exit 1; an Ed25519 key alone cannot be the trust
    assert _cli("ota", "keys", "init", "--out", str(tmp_path / "other")).returncode == 0
    wrong = _cli("ota", "inspect", str(man), "--trust",
                 str(tmp_path / "other" / "operator-mldsa65.pub"))
    assert wrong.returncode == 1 and "REFUSED unknown-key" in wrong.stdout, wrong.stdout
    ed_only = _cli("ota", "inspect", str(man), "--trust", str(keys / "operator-ed25519.pub"))
    assert ed_only.returncode == 1 and "ML-DSA-65 trust anchors; there are 0" in ed_only.stderr


def test_sign_refuses_bad_arguments(keys: Path, tmp_path: Path) -> None:
    base = ["ota", "sign", "--key", str(keys / "operator-mldsa65.key"), "--component",
            "priority", "--sequence", "1", "--model", str(MODELS / "priority.onnx"),
            "--class", "default", "--min-version", "0.1", "--out", str(tmp_path)]
    res = _cli(*base, "--gate", "min_vibes=3")
    assert res.returncode == 1 and "--gate 'min_vibes=3'" in res.stderr
    res = _cli(*base[:2], "--key", str(keys / "operator-ed25519.key"), *base[4:])
    assert res.returncode == 1 and "ML-DSA-65 operator key is required" in res.stderr
    res = _cli(*base[:2], "--key", str(keys / "operator-mldsa65.pub"), *base[4:])
    assert res.returncode == 1 and res.stderr.startswith("error: ")
    assert not list(tmp_path.iterdir())


def _conf(tmp_path: Path, ota: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n'
                    '[[upstream]]\nname = "cloud"\nurls = ["mqtt://127.0.0.1:1883"]\n'
                    f"[ota]\n{ota}")
    return path


def test_ota_config_section(keys: Path, tmp_path: Path) -> None:
    pub = keys / "operator-mldsa65.pub"
    conf = _conf(tmp_path, f'enabled = true\ntrust = ["{pub}"]\ngateway_class = "line-3"\n'
                 'bandwidth = 100000\nshadow_min_agreement = 0.99\n')
    res = _cli("check-config", str(conf))
    assert res.returncode == 0, res.stderr
    from rapidmq_edge.config import load_config
    ota = load_config(conf).ota
    assert (ota.enabled, ota.trust, ota.gateway_class, ota.prefix, ota.bandwidth,
            ota.shadow_min_agreement, ota.max_payload_bytes) == (
        True, (pub,), "line-3", "rapidmq/ota", 100000, 0.99, 64 << 20)

    bad = _conf(tmp_path, 'gateway_clas = "x"\nchunk_window = 0\n')
    res = _cli("check-config", str(bad))
    lines = res.stderr.splitlines()
    assert res.returncode == 2
    assert 'error: ota.gateway_clas: unknown key (did you mean "gateway_class"?)' in lines
    assert "error: ota.chunk_window: must be an integer from 1 to 1024, got 0" in lines
    # a trust file that is not an operator public key (here: the secret key) is named
    wrong = _conf(tmp_path, f'enabled = true\ntrust = ["{pub}", "{keys}/operator-ed25519.key"]\n')
    res = _cli("check-config", str(wrong))
    lines = res.stderr.splitlines()
    assert res.returncode == 2
    assert any(ln.startswith("error: ota.trust[1]: ") and "not an operator public key" in ln
               for ln in lines), lines

    with pytest.raises(ConfigError, match=r"ota\.upstream: no \[\[upstream\]\] named"):
        parse_config({"ota": {"upstream": "elsewhere"}, "upstream": [
            {"name": "cloud", "urls": ["mqtt://127.0.0.1:1883"]}]}, tmp_path)
    with pytest.raises(ConfigError, match=r"ota\.trust: required when enabled"):
        parse_config({"ota": {"enabled": True}, "upstream": [
            {"name": "cloud", "urls": ["mqtt://127.0.0.1:1883"]}]}, tmp_path)
    assert parse_config({}, tmp_path).ota.enabled is False
