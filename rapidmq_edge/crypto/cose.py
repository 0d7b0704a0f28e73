"""COSE/CBOR building blocks (RFC 9052/9053, RFC 9964, draft-ietf-cose-hpke) used here.

Only the structures this package needs: strict CBOR decoding (no trailing bytes), the
``Enc_structure`` / ``Sig_structure`` (RFC 9052 §5.3, §4.4) and COSE_Key "AKP" (RFC 9964).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cbor2

from .errors import MalformedError

__all__ = [
    "ALG_A256GCM",
    "ALG_HPKE_9",
    "ALG_ML_DSA_65",
    "HDR_ALG",
    "HDR_EK",
    "HDR_KID",
    "HDR_PARTIAL_IV",
    "KTY_AKP",
    "TAG_COSE_ENCRYPT0",
    "TAG_COSE_SIGN1",
    "akp_public_key",
    "decode_strict",
    "dumps",
    "enc_structure",
    "parse_akp_public_key",
    "show",
    "sig_structure",
]

# RFC 9052 header labels
HDR_ALG = 1
HDR_KID = 4
HDR_PARTIAL_IV = 6
# draft-ietf-cose-hpke: "ek" (encapsulated key) header parameter. PROVISIONAL value (draft).
HDR_EK = -4

# algorithms
ALG_A256GCM = 3  # RFC 9053
ALG_ML_DSA_65 = -49  # RFC 9964 (final)
# draft-ietf-cose-hpke-pq-pqt: HPKE-9 = MLKEM768-X25519 (X-Wing, KEM 0x647A), SHAKE256, AES-256-GCM.
# PROVISIONAL code point (draft value, may change at IANA registration).
ALG_HPKE_9 = 56

# RFC 9964 key type AKP ("Algorithm Key Pair"), parameters pub = -1, priv = -2
KTY_AKP = 7
_KEY_KTY, _KEY_KID, _KEY_ALG, _AKP_PUB = 1, 2, 3, -1

TAG_COSE_ENCRYPT0 = 16
TAG_COSE_SIGN1 = 18


def dumps(obj: Any) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2: sorted map keys, shortest forms)."""
    return cbor2.dumps(obj, canonical=True)


def decode_strict(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; trailing bytes, truncation or garbage raise MalformedError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError(f"{what}: expected bytes, got {type(data).__name__}")
    buf = io.BytesIO(bytes(data))
    try:
        obj = cbor2.CBORDecoder(buf).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise MalformedError(f"{what}: not valid CBOR ({exc})") from None
    if buf.tell() != len(data):
        raise MalformedError(f"{what}: {len(data) - buf.tell()} trailing bytes after the CBOR item")
    return obj


def show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for an error message, bounded: decoded CBOR may hold an integer too
    large for ``repr`` (Python's 4300-digit limit raises ValueError) or a huge structure."""
    try:
        text = repr(value)
    except ValueError:
        return f"<{type(value).__name__} of {value.bit_length()} bits>" if isinstance(
            value, int) else f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def enc_structure(protected: bytes, external_aad: bytes) -> bytes:
    """RFC 9052 §5.3 Enc_structure for COSE_Encrypt0."""
    return dumps(["Encrypt0", protected, external_aad])


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    """RFC 9052 §4.4 Sig_structure for COSE_Sign1."""
    return dumps(["Signature1", protected, external_aad, payload])


def untag(obj: Any, tag: int, what: str) -> Any:
    """Strip an optional CBOR tag ``tag``; any other tag is malformed."""
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != tag:
            raise MalformedError(f"{what}: CBOR tag {obj.tag}, expected {tag}")
        return obj.value
    return obj


def as_array(obj: Any, length: int, what: str) -> Sequence[Any]:
    """Check that ``obj`` is a CBOR array of exactly ``length`` items."""
    if not isinstance(obj, list | tuple) or len(obj) != length:
        raise MalformedError(f"{what}: expected an array of {length} items")
    return obj


def as_map(obj: Any, what: str) -> Mapping[Any, Any]:
    """Check that ``obj`` is a CBOR map."""
    if not isinstance(obj, Mapping):
        raise MalformedError(f"{what}: expected a map")
    return obj


def as_bytes(obj: Any, what: str, length: int | None = None) -> bytes:
    """Check that ``obj`` is a byte string (of ``length`` bytes when given)."""
    if not isinstance(obj, bytes) or (length is not None and len(obj) != length):
        size = f" of {length} bytes" if length is not None else ""
        raise MalformedError(f"{what}: expected a byte string{size}")
    return obj


def akp_public_key(alg: int, kid: bytes, public_key: bytes) -> bytes:
    """COSE_Key AKP (RFC 9964), public part only: ``{1: 7, 2: kid, 3: alg, -1: pub}``."""
    return dumps({_KEY_KTY: KTY_AKP, _KEY_KID: kid, _KEY_ALG: alg, _AKP_PUB: public_key})


def parse_akp_public_key(data: bytes) -> tuple[int, bytes, bytes]:
    """Parse an AKP COSE_Key; returns ``(alg, kid, public_key)``. Private parts are refused."""
    key = as_map(decode_strict(data, "COSE_Key"), "COSE_Key")
    if key.get(_KEY_KTY) != KTY_AKP:
        raise MalformedError("COSE_Key: kty is not AKP (7)")
    if -2 in key:
        raise MalformedError("COSE_Key: contains a private key (priv, -2); refusing")
    alg = key.get(_KEY_ALG)
    if not isinstance(alg, int):
        raise MalformedError("COSE_Key: alg missing")
    kid = as_bytes(key.get(_KEY_KID), "COSE_Key kid")
    pub = as_bytes(key.get(_AKP_PUB), "COSE_Key pub")
    return alg, kid, pub


def sign1_ml_dsa_65(payload: bytes, kid: bytes, sign: Callable[[bytes], bytes],
                    external_aad: bytes = b"") -> bytes:
    """COSE_Sign1 (tag 18) of ``payload``: protected ``{1: -49, 4: kid}``, empty unprotected,
    the ML-DSA-65 ``sign`` over the RFC 9052 Sig_structure with ``external_aad``."""
    protected = dumps({HDR_ALG: ALG_ML_DSA_65, HDR_KID: kid})
    signature = sign(sig_structure(protected, payload, external_aad))
    return dumps(cbor2.CBORTag(TAG_COSE_SIGN1, [protected, {}, payload, signature]))


def parse_sign1_ml_dsa_65(data: bytes, what: str,
                          kid_size: int) -> tuple[bytes, bytes, bytes, bytes]:
    """Parse (not verify) an ML-DSA-65 COSE_Sign1: ``(kid, protected, payload, signature)``;
    MalformedError naming ``what`` on any deviation."""
    arr = as_array(untag(decode_strict(data, what), TAG_COSE_SIGN1, what), 4, what)
    protected = as_bytes(arr[0], f"{what} protected")
    hdr = as_map(decode_strict(protected, f"{what} protected"), "protected")
    if hdr.get(HDR_ALG) != ALG_ML_DSA_65:
        raise MalformedError(f"{what}: alg {show(hdr.get(HDR_ALG))} is not ML-DSA-65 (-49)")
    kid = as_bytes(hdr.get(HDR_KID), f"{what} kid", kid_size)
    as_map(arr[1], f"{what} unprotected")
    return kid, protected, as_bytes(arr[2], f"{what} payload"), as_bytes(arr[3],
                                                                          f"{what} signature")

