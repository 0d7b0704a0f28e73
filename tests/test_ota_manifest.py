"""OTA manifests (issue 14 part 1): every bad manifest of the corpus is refused with its
reason, with real ML-DSA-65 / Ed25519 signatures; the committed test vector verifies and
decodes to its recorded fields; trust anchors rotate; payload encryption to X-Wing recipient
keys round-trips; the accepted sequence survives kill -9 and never goes down."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from rapidmq_edge.crypto import cose
from rapidmq_edge.crypto.keys import RecipientKey, RecipientKeyring
from rapidmq_edge.ota.manifest import (
    Gate,
    Manifest,
    ManifestRefused,
    TensorSpec,
    Vectors,
    build_manifest,
    decrypt_payload,
    encode_manifest,
    parse_envelope,
    sign_envelope,
    verify_envelope,
)
from rapidmq_edge.ota.operator_keys import OperatorSigner, parse_public_key
from rapidmq_edge.ota.sequences import SequenceStore
from rapidmq_edge.ota.trust import TrustAnchors

VECTOR = Path(__file__).parent / "vectors" / "ota" / "manifest-v1.json"
GW = dict(gateway_class="edge-a", gateway_version="0.1.0", max_payload_bytes=1 << 20)


def _mldsa(label: str) -> OperatorSigner:
    return OperatorSigner.mldsa65(hashlib.sha256(f"test operator {label}".encode()).digest())


def _ed(label: str) -> OperatorSigner:
    return OperatorSigner.ed25519(hashlib.sha256(f"test ed25519 {label}".encode()).digest())


OP, OTHER, NEW = _mldsa("op"), _mldsa("stranger"), _mldsa("new")
ED = _ed("op")


def _manifest(**over: Any) -> Manifest:
    args: dict[str, Any] = dict(
        component="priority", sequence=5, version="1.0.0", payload=os.urandom(3000),
        gateway_class="edge-a", min_gateway_version="0.1.0",
        inputs=(TensorSpec("features", "float32", (None, 82)),),
        outputs=(TensorSpec("label", "int64", (None,)),),
        vectors=Vectors(((0.0,) * 82, (1.0,) * 82), (2, 0)), chunk_size=1024)
    args.update(over)
    return build_manifest(**args)[0]


def _trust(*signers: OperatorSigner, **kw: Any) -> TrustAnchors:
    return TrustAnchors([s.public() for s in signers], **kw)


def _refused(reason: str, data: bytes, trust: TrustAnchors | None = None, **kw: Any) -> str:
    args = {**GW, **kw}
    with pytest.raises(ManifestRefused) as info:
        verify_envelope(data, trust or _trust(OP), **args)
    assert info.value.reason == reason, info.value
    return info.value.detail


class _Forger:
    """Claims a trusted kid but signs something else (a forged or corrupted signature)."""

    def __init__(self, real: OperatorSigner, alg: int | None = None) -> None:
        self.real, self.kid, self.alg = real, real.kid, real.alg if alg is None else alg

    def sign(self, message: bytes) -> bytes:
        return self.real.sign(message + b"!")


def _envelope_parts(data: bytes) -> tuple[bytes, list[Any]]:
    env = cbor2.loads(data).value
    return env[3], cbor2.loads(env[2])


def _reassemble(body: bytes, auth: list[Any]) -> bytes:
    return cose.dumps(cbor2.CBORTag(107, {2: cose.dumps(auth), 3: body}))


# ----------------------------------------------------------------------------- good paths


def test_a_signed_manifest_verifies_and_round_trips() -> None:
    m = _manifest(gate=Gate(min_messages=100, min_agreement=0.9, min_seconds=60),
                  uri="https://x.example/p", vectors=Vectors(((0,) * 82, (1,) * 82), (2, 0)))
    data = sign_envelope(m, [OP])
    got = verify_envelope(data, _trust(OP), **GW)
    assert got == m and got.status == "new" and got.signers == (OP.kid,)
    assert got.chunk_count == 3 and got.chunk_range(2) == (2048, 952)
    assert got.gate == Gate(min_messages=100, min_agreement=0.9, min_seconds=60.0)
    assert got.manifest_sha256 == hashlib.sha256(parse_envelope(data)[0]).digest()
    assert encode_manifest(got) == encode_manifest(m)  # deterministic encoding


def test_the_committed_test_vector_verifies_and_decodes() -> None:
    vec = json.loads(VECTOR.read_text())
    assert "TEST KEY" in vec["WARNING"]
    pub = parse_public_key(bytes.fromhex(vec["public_key_cose"]))
    assert OperatorSigner.mldsa65(bytes.fromhex(vec["test_seed"])).public() == pub
    envelope, payload = bytes.fromhex(vec["envelope"]), bytes.fromhex(vec["payload"])
    m = verify_envelope(envelope, TrustAnchors([pub]), gateway_class="test-class",
                        gateway_version="0.1.0", max_payload_bytes=1 << 20)
    exp = vec["expected"]
    assert (m.component, m.sequence, m.version, m.gateway_class, m.min_gateway_version,
            m.payload_size, m.chunk_size, m.uri, m.model_format) == (
        exp["component"], exp["sequence"], exp["version"], exp["gateway_class"],
        exp["min_gateway_version"], exp["payload_size"], exp["chunk_size"], exp["uri"],
        exp["model_format"])
    assert m.payload_digest == hashlib.sha256(payload).digest() == bytes.fromhex(
        exp["payload_sha256"])
    assert [d.hex() for d in m.chunk_digests] == exp["chunk_sha256"] == [
        hashlib.sha256(payload[i:i + 512]).hexdigest() for i in range(0, len(payload), 512)]
    assert list(m.vectors.labels) == exp["vector_labels"]
    assert m.manifest_sha256.hex() == exp["manifest_sha256"]
    assert m.signers == (bytes.fromhex(vec["kid"]),)
    # the manifest bytes are what the documented fields encode to (generate.py's fields)
    sys.path.insert(0, str(VECTOR.parent))
    try:
        import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    rebuilt, shipped = build_manifest(**generate.fields())
    assert shipped == payload and parse_envelope(envelope)[0] == encode_manifest(rebuilt)


def test_hybrid_signature_and_thresholds() -> None:
    m = _manifest()
    both = sign_envelope(m, [OP, ED])
    assert verify_envelope(both, _trust(OP, ED, require_classical=True), **GW).signers == (
        OP.kid, ED.kid)
    _refused("unknown-key", sign_envelope(m, [OP]), _trust(OP, ED, require_classical=True))
    # Ed25519 alone never suffices, even from a trusted key
    assert "0 trusted ML-DSA-65" in _refused("unknown-key", sign_envelope(m, [ED]),
                                             _trust(OP, ED))
    two = _trust(OP, NEW, threshold=2)
    _refused("unknown-key", sign_envelope(m, [OP]), two)
    _refused("unknown-key", sign_envelope(m, [OP, OP]), two)  # one key counts once
    assert verify_envelope(sign_envelope(m, [OP, NEW]), two, **GW).signers == (OP.kid, NEW.kid)


def test_key_rotation_drill() -> None:
    """Trust old; ship a manifest signed by old + new; trust both, then new only."""
    store: dict[str, tuple[int, bytes]] = {}

    class Accepted:
        def check(self, component: str, sequence: int, sha: bytes) -> str:
            from rapidmq_edge.ota.sequences import decide
            verdict = decide(store.get(component), component, sequence, sha)
            store[component] = (sequence, sha)
            return verdict

    acc = Accepted()
    old_only, both, new_only = _trust(OP), _trust(OP, NEW), _trust(NEW)
    assert verify_envelope(sign_envelope(_manifest(sequence=1), [OP]), old_only,
                           accepted=acc, **GW).status == "new"
    rotation = sign_envelope(_manifest(sequence=2), [OP, NEW])
    assert verify_envelope(rotation, old_only, accepted=acc, **GW).signers == (OP.kid,)
    assert verify_envelope(rotation, both, **GW).signers == (OP.kid, NEW.kid)
    assert verify_envelope(rotation, new_only, **GW).signers == (NEW.kid,)
    verify_envelope(sign_envelope(_manifest(sequence=3), [NEW]), new_only, accepted=acc, **GW)
    # the retired key alone is no longer enough, and the rotation manifest cannot come back
    _refused("unknown-key", sign_envelope(_manifest(sequence=4), [OP]), new_only)
    _refused("rollback", rotation, new_only, accepted=acc)


# ----------------------------------------------------------------------------- the bad corpus


def _bad_corpus() -> dict[str, tuple[str, Callable[[], bytes], dict[str, Any]]]:
    m = _manifest()
    good = sign_envelope(m, [OP])
    body, auth = _envelope_parts(good)
    other_body = encode_manifest(_manifest(version="6.6.6"))
    big = _manifest(payload=os.urandom(5000))
    return {
        "bad signature": ("bad-signature", lambda: sign_envelope(m, [_Forger(OP)]), {}),
        "signature of another trusted-kid alg": (
            "bad-signature", lambda: sign_envelope(m, [_Forger(OP, alg=-19)]), {}),
        "manifest swapped under the signature": (
            "bad-signature", lambda: _reassemble(other_body, auth), {}),
        "digest updated, old signature": ("bad-signature", lambda: _reassemble(
            other_body, [cose.dumps([-16, hashlib.sha256(other_body).digest()]), *auth[1:]]),
            {}),
        "unknown key": ("unknown-key", lambda: sign_envelope(m, [OTHER]), {}),
        "wrong class": ("wrong-class",
                        lambda: sign_envelope(_manifest(gateway_class="edge-b"), [OP]), {}),
        "gateway too old": ("gateway-too-old", lambda: sign_envelope(
            _manifest(min_gateway_version="0.2"), [OP]), {}),
        "unknown component": ("unknown-component",
                              lambda: sign_envelope(_manifest(component="vision"), [OP]), {}),
        "oversize payload": ("oversize", lambda: sign_envelope(big, [OP]),
                             {"max_payload_bytes": 4999}),
        "too few chunk digests": ("bad-chunking", lambda: sign_envelope(dataclasses.replace(
            m, chunk_digests=m.chunk_digests[:-1]), [OP]), {}),
        "chunk size not matching the digests": ("bad-chunking", lambda: sign_envelope(
            dataclasses.replace(m, chunk_size=2048), [OP]), {}),
        "short chunk digest": ("bad-chunking", lambda: sign_envelope(dataclasses.replace(
            m, chunk_digests=(b"x" * 31, *m.chunk_digests[1:])), [OP]), {}),
        "envelope too large": ("too-large", lambda: good, {"max_envelope_bytes": len(good) - 1}),
        "truncated": ("malformed", lambda: good[:-7], {}),
        "trailing bytes": ("malformed", lambda: good + b"\x00", {}),
        "garbage": ("malformed", lambda: os.urandom(600), {}),
        "not tagged 107": ("malformed", lambda: cose.dumps({2: cose.dumps(auth), 3: body}), {}),
        "attached payload": ("malformed", lambda: _reassemble(body, [auth[0], cose.dumps(
            cbor2.CBORTag(18, [*cbor2.loads(auth[1]).value[:2], b"x",
                               cbor2.loads(auth[1]).value[3]]))]), {}),
        "no signature": ("malformed", lambda: _reassemble(body, auth[:1]), {}),
        "manifest version 2": ("malformed", lambda: sign_envelope(
            cose.dumps({**cbor2.loads(body), 1: 2}), [OP]), {}),
        "unknown manifest element": ("malformed", lambda: sign_envelope(
            cose.dumps({**cbor2.loads(body), 99: 1}), [OP]), {}),
        "same content, another encoding": ("malformed", lambda: sign_envelope(cbor2.dumps(
            dict(reversed(list(cbor2.loads(body).items())))), [OP]), {}),
    }


CORPUS = _bad_corpus()


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_manifests_are_refused_with_their_reason(case: str) -> None:
    reason, make, kw = CORPUS[case]
    detail = _refused(reason, make(), **kw)
    assert detail  # every refusal says what exactly


def test_sequences_rollback_conflict_duplicate_and_replay(tmp_path: Path) -> None:
    with SequenceStore(tmp_path / "ota.sqlite") as store:
        m5 = sign_envelope(_manifest(sequence=5), [OP])
        got = verify_envelope(m5, _trust(OP), accepted=store, **GW)
        assert store.accept(got.component, got.sequence, got.manifest_sha256) == "new"
        again = verify_envelope(m5, _trust(OP), accepted=store, **GW)
        assert again.status == "duplicate" and again == got
        _refused("rollback", sign_envelope(_manifest(sequence=4), [OP]), accepted=store)
        _refused("conflict", sign_envelope(_manifest(sequence=5, version="1.0.1"), [OP]),
                 accepted=store)
        # another component has its own sequence
        threat = verify_envelope(sign_envelope(_manifest(component="threat", sequence=1), [OP]),
                                 _trust(OP), accepted=store, **GW)
        assert threat.status == "new"
        m6 = verify_envelope(sign_envelope(_manifest(sequence=6), [OP]), _trust(OP),
                             accepted=store, **GW)
        store.accept("priority", 6, m6.manifest_sha256)
        assert "lower than the accepted 6" in _refused("rollback", m5, accepted=store)
        # a rollback of the running model never lowers the accepted sequence
        with pytest.raises(ManifestRefused, match="rollback"):
            store.accept("priority", 5, got.manifest_sha256)
        assert store.current("priority") == (6, m6.manifest_sha256)
        mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


_ACCEPT_AND_HANG = """
import sys, time
from pathlib import Path
from rapidmq_edge.ota.sequences import SequenceStore
store = SequenceStore(Path(sys.argv[1]))
print(store.accept("anomaly", int(sys.argv[2]), bytes.fromhex(sys.argv[3])), flush=True)
time.sleep(60)
"""


def test_the_accepted_sequence_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "ota" / "ota.sqlite"
    sha = hashlib.sha256(b"manifest 7").digest()
    proc = subprocess.Popen([sys.executable, "-c", _ACCEPT_AND_HANG, str(db), "7", sha.hex()],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "new"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    with SequenceStore.in_data_dir(tmp_path) as fresh:
        assert fresh.current("anomaly") == (7, sha)
        with pytest.raises(ManifestRefused, match="rollback"):
            fresh.check("anomaly", 6, hashlib.sha256(b"older").digest())
        assert fresh.check("anomaly", 7, sha) == "duplicate"
        assert fresh.accept("anomaly", 8, hashlib.sha256(b"m8").digest()) == "new"
    row = sqlite3.connect(db).execute(
        "SELECT sequence FROM ota_accepted WHERE component = 'anomaly'").fetchone()
    assert row == (8,)


# ----------------------------------------------------------------------------- encryption


def test_encrypted_payload_round_trips_only_for_its_recipients() -> None:
    a, b, stranger = RecipientKey.generate(), RecipientKey.generate(), RecipientKey.generate()
    model = os.urandom(5000)
    m, shipped = build_manifest(
        component="threat", sequence=9, version="2", payload=model, gateway_class="edge-a",
        min_gateway_version="0.1", inputs=(), outputs=(), vectors=Vectors((), ()),
        chunk_size=1024, encrypt_to=[a.public(), b.public()])
    assert model not in shipped and len(shipped) == len(model) + 16
    got = verify_envelope(sign_envelope(m, [OP]), _trust(OP), **GW)
    assert got.encryption is not None and got.encryption.plain_size == 5000
    assert decrypt_payload(got, shipped, a) == model
    assert decrypt_payload(got, shipped, RecipientKeyring([stranger, b])) == model
    with pytest.raises(ManifestRefused, match="not-a-recipient"):
        decrypt_payload(got, shipped, stranger)
    flipped = bytes([shipped[0] ^ 1]) + shipped[1:]
    with pytest.raises(ManifestRefused, match="payload-mismatch"):
        decrypt_payload(got, flipped, a)
    # a manifest whose encryption element was altered (re-signed, so the digests hold) fails
    # to decrypt: the wrapped key is bound to component, sequence and the payload digest
    moved = dataclasses.replace(got, sequence=10)
    with pytest.raises(ManifestRefused, match="bad-payload"):
        decrypt_payload(moved, shipped, a)
    _refused("oversize", sign_envelope(m, [OP]), max_payload_bytes=4999)


def test_verification_cost() -> None:
    """One envelope (ML-DSA-65 + Ed25519) verifies in well under 20 ms here."""
    data = sign_envelope(_manifest(payload=os.urandom(1 << 20), chunk_size=16384), [OP, ED])
    trust = _trust(OP, ED, require_classical=True)
    verify_envelope(data, trust, **{**GW, "max_payload_bytes": 1 << 21})
    t0 = time.perf_counter()
    for _ in range(20):
        verify_envelope(data, trust, **{**GW, "max_payload_bytes": 1 << 21})
    per = (time.perf_counter() - t0) / 20
    print(f"verify {len(data)} B envelope, 64 chunks: {per * 1e3:.2f} ms")
    assert per < 0.02


def test_trust_files_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "op.pub"
    good.write_bytes(OP.public().cose())
    ed = tmp_path / "ed.pub"
    ed.write_bytes(ED.public().cose())
    anchors = TrustAnchors.from_files([good, ed])
    assert OP.kid in anchors and ED.kid in anchors and len(anchors) == 2
    private = tmp_path / "private.cose"  # an AKP key with its private part: refused
    private.write_bytes(cose.dumps({1: 7, 2: OP.kid, 3: -49, -1: OP.public_key, -2: b"x" * 32}))
    wrong_kid = tmp_path / "wrong-kid.pub"
    wrong_kid.write_bytes(cose.akp_public_key(-49, NEW.kid, OP.public_key))
    for path, says in ((private, "private key"), (wrong_kid, "kid does not match"),
                       (tmp_path / "missing.pub", "No such file")):
        with pytest.raises(ValueError, match=says) as info:
            TrustAnchors.from_files([good, path])
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="ML-DSA-65 trust anchors; there are 0"):
        TrustAnchors.from_files([ed])
    with pytest.raises(ValueError, match="threshold 2"):
        TrustAnchors.from_files([good, ed], threshold=2)
