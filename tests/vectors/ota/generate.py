"""Regenerate ``manifest-v1.json``: a deterministic OTA manifest signed by a TEST key.

THE SEED BELOW IS A PUBLIC TEST KEY, NOT A SECRET. Never put its public key in a real
``[ota] trust`` list: anyone can sign with it. The manifest bytes are deterministic (canonical
CBOR); the ML-DSA-65 signature is hedged (randomised), so a regenerated file differs only in
the signature and the envelope bytes that contain it.

    .venv/bin/python tests/vectors/ota/generate.py
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rapidmq_edge.ota.manifest import Gate, TensorSpec, Vectors, build_manifest, sign_envelope
from rapidmq_edge.ota.operator_keys import OperatorSigner

TEST_SEED = hashlib.sha256(b"rapidmq-edge OTA TEST KEY - public, never trust it").digest()


def payload() -> bytes:
    """1,300 deterministic bytes (a stand-in for a model: 3 chunks of 512)."""
    out, block = b"", b"rapidmq-edge ota vector payload"
    while len(out) < 1300:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:1300]


def fields() -> dict[str, object]:
    """The build_manifest arguments of the vector."""
    return dict(
        component="anomaly", sequence=42, version="1.2.3", payload=payload(),
        gateway_class="test-class", min_gateway_version="0.1.0",
        inputs=(TensorSpec("features", "float32", (None, 10)),),
        outputs=(TensorSpec("label", "int64", (None,)),
                 TensorSpec("probabilities", "float32", (None, 5))),
        vectors=Vectors(((0.0,) * 10, (1.5, 0.0, 2.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0, 8.0)),
                        (0, 3)),
        chunk_size=512, uri="https://models.example/anomaly-42.payload",
        gate=Gate(min_messages=500, min_agreement=0.97, max_cost_us=50.0),
    )


def main() -> None:
    signer = OperatorSigner.mldsa65(TEST_SEED)
    manifest, shipped = build_manifest(**fields())  # type: ignore[arg-type]
    envelope = sign_envelope(manifest, [signer])
    out = {
        "WARNING": "TEST KEY: the seed is public; never trust its public key in production",
        "test_seed": TEST_SEED.hex(),
        "public_key_cose": signer.public().cose().hex(),
        "kid": signer.kid.hex(),
        "envelope": envelope.hex(),
        "payload": shipped.hex(),
        "expected": {
            "component": manifest.component, "sequence": manifest.sequence,
            "version": manifest.version, "gateway_class": manifest.gateway_class,
            "min_gateway_version": manifest.min_gateway_version,
            "payload_sha256": manifest.payload_digest.hex(),
            "payload_size": manifest.payload_size, "chunk_size": manifest.chunk_size,
            "chunk_sha256": [d.hex() for d in manifest.chunk_digests],
            "uri": manifest.uri, "model_format": manifest.model_format,
            "vector_labels": list(manifest.vectors.labels),
            "manifest_sha256": manifest.manifest_sha256.hex(),
        },
    }
    path = Path(__file__).with_name("manifest-v1.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({len(envelope)} B envelope)")


if __name__ == "__main__":
    main()
