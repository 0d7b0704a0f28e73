"""Operator signing keys for OTA manifests (sans-I/O: bytes in, bytes out).

The operator key is not a gateway identity: it signs manifests offline, and gateways trust its
public half (``[ota] trust``). Files, as ``rapidmq-edge ota keys init`` writes them:

* ML-DSA-65 (required): secret = the 32-byte seed as PKCS#8 PEM (or the CBOR seed file where
  ``cryptography`` lacks ML-DSA; :mod:`rapidmq_edge.crypto.keyfile`), public = COSE_Key AKP
  ``{1: 7, 2: kid, 3: -49, -1: pub}`` (RFC 9964).
* Ed25519 (optional, the classical half during the PQ transition): secret = PKCS#8 PEM,
  public = COSE_Key OKP ``{1: 1, 2: kid, 3: -19, -1: 6, -2: x}`` (RFC 9053, alg -19 = Ed25519,
  RFC 9864; -8 "EdDSA" is accepted on verify).

A kid is :func:`rapidmq_edge.crypto.keys.kid_for` of the raw public key (8 bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..crypto import cose, keyfile
from ..crypto.backend import MLDSA65_PUBLIC_KEY_SIZE, MLDSA65_SEED_SIZE, default_backend
from ..crypto.errors import KeyFileError, MalformedError
from ..crypto.keys import kid_for

__all__ = [
    "ALG_ED25519",
    "ALG_EDDSA",
    "ED25519_ALGS",
    "OperatorPublicKey",
    "OperatorSigner",
    "ed25519_secret_file",
    "generate_mldsa_seed",
    "load_signer",
    "mldsa_secret_file",
    "parse_public_key",
]

ALG_ED25519 = -19  # RFC 9864 fully-specified Ed25519
ALG_EDDSA = -8  # RFC 9053 EdDSA (accepted on verify, never written)
ED25519_ALGS = (ALG_ED25519, ALG_EDDSA)
_KTY_OKP, _CRV_ED25519 = 1, 6
_PEM_PREFIXES = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


@dataclass(frozen=True)
class OperatorPublicKey:
    """A trusted operator public key: ``alg`` -49 (ML-DSA-65) or -19 (Ed25519)."""

    alg: int
    kid: bytes
    public_key: bytes

    @property
    def classical(self) -> bool:
        """True for Ed25519 (not post-quantum)."""
        return self.alg in ED25519_ALGS

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` over ``message`` is valid for this key."""
        if self.classical:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric import ed25519

            try:
                ed25519.Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                    signature, message)
            except (InvalidSignature, ValueError):
                return False
            return True
        return default_backend().mldsa65_verifier(self.public_key).verify(message, signature)

    def cose(self) -> bytes:
        """The COSE_Key public key file content."""
        if self.classical:
            return cose.dumps({1: _KTY_OKP, 2: self.kid, 3: ALG_ED25519, -1: _CRV_ED25519,
                               -2: self.public_key})
        return cose.akp_public_key(cose.ALG_ML_DSA_65, self.kid, self.public_key)


def parse_public_key(data: bytes) -> OperatorPublicKey:
    """An operator public key from its COSE_Key file; MalformedError naming what is wrong
    (private parts, other algorithms, a kid that is not the key's)."""
    key = cose.as_map(cose.decode_strict(data, "COSE_Key"), "COSE_Key")
    kty = key.get(1)
    if kty == cose.KTY_AKP:
        alg, kid, pub = cose.parse_akp_public_key(data)
        if alg != cose.ALG_ML_DSA_65:
            raise MalformedError(f"COSE_Key: alg {cose.show(alg)} is not ML-DSA-65 (-49)")
        if len(pub) != MLDSA65_PUBLIC_KEY_SIZE:
            raise MalformedError(f"COSE_Key: ML-DSA-65 public key must be "
                                 f"{MLDSA65_PUBLIC_KEY_SIZE} bytes")
    elif kty == _KTY_OKP:
        if -4 in key:
            raise MalformedError("COSE_Key: contains a private key (d, -4); refusing")
        if key.get(3) not in ED25519_ALGS or key.get(-1) != _CRV_ED25519:
            raise MalformedError("COSE_Key: OKP key is not Ed25519 (alg -19/-8, crv 6)")
        kid = cose.as_bytes(key.get(2), "COSE_Key kid")
        pub = cose.as_bytes(key.get(-2), "COSE_Key x", 32)
        alg = ALG_ED25519
    else:
        raise MalformedError(f"COSE_Key: kty {cose.show(kty)} is neither AKP (7) nor OKP (1)")
    if kid != kid_for(pub):
        raise MalformedError("COSE_Key: kid does not match the public key")
    return OperatorPublicKey(alg, kid, pub)


class OperatorSigner:
    """A loaded operator secret key: ``alg``, ``kid``, ``sign(message)``, ``public()``."""

    def __init__(self, alg: int, secret: Any, public_key: bytes) -> None:
        self.alg = alg
        self._secret = secret
        self.public_key = public_key
        self.kid = kid_for(public_key)

    @classmethod
    def mldsa65(cls, seed: bytes) -> OperatorSigner:
        """From a 32-byte ML-DSA-65 seed."""
        signer = default_backend().mldsa65_signer(seed)
        return cls(cose.ALG_ML_DSA_65, signer, signer.public_key)

    @classmethod
    def ed25519(cls, raw_private: bytes) -> OperatorSigner:
        """From a 32-byte raw Ed25519 private key."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw_private)
        return cls(ALG_ED25519, key, key.public_key().public_bytes_raw())

    def sign(self, message: bytes) -> bytes:
        """The signature over ``message`` (pure ML-DSA-65, empty context; or Ed25519)."""
        return bytes(self._secret.sign(message))

    def public(self) -> OperatorPublicKey:
        """The public half, as trust anchors hold it."""
        return OperatorPublicKey(self.alg, self.kid, self.public_key)

    def __repr__(self) -> str:
        return f"OperatorSigner(alg={self.alg}, kid={self.kid.hex()})"


def generate_mldsa_seed() -> bytes:
    """32 fresh bytes of ``os.urandom`` for an ML-DSA-65 operator key."""
    return os.urandom(MLDSA65_SEED_SIZE)


def mldsa_secret_file(seed: bytes, passphrase: bytes | None = None) -> bytes:
    """The secret key file of an ML-DSA-65 seed (PKCS#8 PEM, or the CBOR seed file)."""
    return keyfile.encode_seed_file(keyfile.ALG_MLDSA65, seed, passphrase)


def ed25519_secret_file(passphrase: bytes | None = None) -> tuple[bytes, bytes]:
    """A new Ed25519 key: ``(PKCS#8 PEM secret file, raw 32-byte private key)``."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    enc: ser.KeySerializationEncryption = (
        ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption())
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    return pem, key.private_bytes_raw()


def load_signer(data: bytes, passphrase: bytes | None = None) -> OperatorSigner:
    """An operator secret key file (ML-DSA-65 or Ed25519, see the module docstring);
    KeyFileError if it is neither or the passphrase is missing or wrong."""
    if data.startswith(_PEM_PREFIXES):
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric import ed25519

        encrypted = data.startswith(_PEM_PREFIXES[1])
        if encrypted and not passphrase:
            raise KeyFileError("key file is passphrase-encrypted; no passphrase given")
        try:
            key = ser.load_pem_private_key(data, passphrase if encrypted else None)
        except UnsupportedAlgorithm as exc:
            raise KeyFileError(f"PKCS#8 key of an unsupported type: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"cannot load PKCS#8 key (wrong passphrase?): {exc}") from None
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return OperatorSigner.ed25519(key.private_bytes_raw())
        from cryptography.hazmat.primitives.asymmetric import mldsa

        if isinstance(key, mldsa.MLDSA65PrivateKey):
            return OperatorSigner.mldsa65(bytes(key.private_bytes_raw()))
        raise KeyFileError(f"PKCS#8 key is {type(key).__name__}, neither ML-DSA-65 nor Ed25519")
    return OperatorSigner.mldsa65(keyfile.decode_seed_file(data, keyfile.ALG_MLDSA65,
                                                           passphrase))
