"""The one HPKE suite used here: COSE "HPKE-9" = X-Wing (KEM 0x647A) + SHAKE256 + AES-256-GCM.

RFC 9180 base mode, single-shot, as ``cryptography`` offers it. That API has no public AAD
argument, so the COSE ``Enc_structure`` that COSE-HPKE would pass as AAD is passed as HPKE
``info`` instead (RFC 9180 §8.1 recommends ``info`` for auxiliary authenticated data with
single-shot APIs). Output of seal is ``enc (1,120 B) || ct``.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import TamperedError

__all__ = ["ENC_SIZE", "hpke_open", "hpke_seal"]

ENC_SIZE = 1120


@functools.cache
def _suite() -> Any:
    from cryptography.hazmat.primitives import hpke

    return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.SHAKE256, hpke.AEAD.AES_256_GCM)


def hpke_seal(public_key: Any, plaintext: bytes, info: bytes) -> tuple[bytes, bytes]:
    """Seal to an X-Wing public key object; returns ``(enc, ciphertext)``."""
    out = bytes(_suite().encrypt(plaintext, public_key, info=info))
    return out[:ENC_SIZE], out[ENC_SIZE:]


def hpke_open(private_key: Any, enc: bytes, ciphertext: bytes, info: bytes) -> bytes:
    """Open; TamperedError if anything (enc, ciphertext, info, key) does not authenticate."""
    from cryptography.exceptions import InvalidTag

    if len(enc) != ENC_SIZE:
        raise TamperedError(f"HPKE enc must be {ENC_SIZE} bytes, got {len(enc)}")
    try:
        return bytes(_suite().decrypt(enc + ciphertext, private_key, info=info))
    except (InvalidTag, ValueError):
        raise TamperedError("HPKE decryption failed (modified data or wrong key)") from None
