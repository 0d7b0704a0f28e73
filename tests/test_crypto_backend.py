"""Backends: cryptography and pqcrypto produce and accept each other's signatures/ciphertexts."""

from __future__ import annotations

import hashlib

import pytest

from rapidmq_edge.crypto.backend import (
    CryptographyBackend,
    PqcryptoBackend,
    available_backends,
    default_backend,
    get_backend,
)
from rapidmq_edge.crypto.errors import BackendUnavailable
from rapidmq_edge.crypto.keys import RecipientKey

SEED32 = bytes(range(32))
SEED64 = bytes(range(64))


def test_both_backends_are_installed_here() -> None:
    # CI (x86-64) installs pqcrypto via the dev extra; the interop tests below need both
    assert available_backends() == ["cryptography", "pqcrypto"]
    assert default_backend().name == "cryptography"


def test_env_var_forces_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAPIDMQ_PQ_BACKEND", "pqcrypto")
    assert default_backend().name == "pqcrypto"
    monkeypatch.setenv("RAPIDMQ_PQ_BACKEND", "nope")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        default_backend()


def test_same_seed_same_public_key() -> None:
    cg, pq = get_backend("cryptography"), get_backend("pqcrypto")
    assert cg.mldsa65_signer(SEED32).public_key == pq.mldsa65_signer(SEED32).public_key
    assert (
        cg.mlkem768_decapsulator(SEED64).public_key == pq.mlkem768_decapsulator(SEED64).public_key
    )


@pytest.mark.parametrize(
    ("signer", "verifier"),
    [
        ("cryptography", "pqcrypto"),
        ("pqcrypto", "cryptography"),
        ("cryptography", "cryptography"),
        ("pqcrypto", "pqcrypto"),
    ],
)
def test_signatures_interoperate(signer: str, verifier: str) -> None:
    s = get_backend(signer).mldsa65_signer(SEED32)
    v = get_backend(verifier).mldsa65_verifier(s.public_key)
    sig = s.sign(b"batch root")
    assert len(sig) == 3309
    assert v.verify(b"batch root", sig)
    assert not v.verify(b"batch rooT", sig)
    bad = bytearray(sig)
    bad[100] ^= 1
    assert not v.verify(b"batch root", bytes(bad))
    assert not v.verify(b"batch root", sig[:-1])


@pytest.mark.parametrize(
    ("enc", "dec"), [("cryptography", "pqcrypto"), ("pqcrypto", "cryptography")]
)
def test_kem_ciphertexts_interoperate(enc: str, dec: str) -> None:
    d = get_backend(dec).mlkem768_decapsulator(SEED64)
    ct, shared = get_backend(enc).mlkem768_encapsulate(d.public_key)
    assert len(ct) == 1088 and len(shared) == 32
    assert d.decapsulate(ct) == shared


def test_wrong_sizes_are_refused() -> None:
    for b in (CryptographyBackend(), PqcryptoBackend()):
        with pytest.raises(ValueError, match="32 bytes"):
            b.mldsa65_signer(b"short")
        with pytest.raises(ValueError, match="1952 bytes"):
            b.mldsa65_verifier(b"\x00" * 10)
        with pytest.raises(ValueError, match="1088 bytes"):
            b.mlkem768_decapsulator(SEED64).decapsulate(b"\x00" * 10)


# X-Wing known answer: draft-connolly-cfrg-xwing-kem-08, appendix C, first vector (seed -> pk).
XWING_SEED = "7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26"
XWING_PK_HEAD = "e2236b35a8c24b39b10aa1323a96a919a2ced88400633a7b07131713fc14b2b5b19cfc3d"
XWING_PK_TAIL = "eff389b27dce59844570216223593d4ba32d9abac8cd049040ef6534"


def test_xwing_seed_expansion_matches_draft_vector() -> None:
    key = RecipientKey(bytes.fromhex(XWING_SEED))
    assert len(key.public_key) == 1216
    assert key.public_key.hex().startswith(XWING_PK_HEAD)
    assert key.public_key.hex().endswith(XWING_PK_TAIL)
    assert key.kid == hashlib.sha256(key.public_key).digest()[:8]
