"""Key material: the gateway's ML-DSA-65 identity and the cloud's X-Wing recipient keys.

Sans-I/O key objects (:class:`GatewayIdentity`, :class:`RecipientKey`, :class:`RecipientPublicKey`,
keyrings) plus :mod:`rapidmq_edge.crypto.keystore` for the files.

* Private keys are **seeds** only (RFC 9964 AKP ``priv``; draft-connolly-cfrg-xwing-kem): 32 bytes
  ML-DSA-65 ``xi``, 32 bytes X-Wing. An X-Wing seed expands as in the X-Wing draft:
  ``SHAKE256(seed, 96)`` = ML-KEM-768 seed ``d || z`` (64 B) || X25519 private key (32 B).
* A key id (kid) is the first 8 bytes of SHA-256 over the raw public key.
* Public keys export as COSE_Key AKP (RFC 9964): ``{1: 7, 2: kid, 3: alg, -1: pub}`` with alg
  -49 (ML-DSA-65) or 56 (HPKE-9, provisional, draft-ietf-cose-hpke-pq-pqt) for X-Wing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import cose
from .backend import (
    MLDSA65_PUBLIC_KEY_SIZE,
    MLDSA65_SEED_SIZE,
    PQBackend,
    Verifier,
    default_backend,
)
from .errors import MalformedError, UnknownKeyError

__all__ = [
    "KID_SIZE",
    "XWING_PUBLIC_KEY_SIZE",
    "XWING_SEED_SIZE",
    "GatewayIdentity",
    "IdentityPublicKey",
    "RecipientKey",
    "RecipientKeyring",
    "RecipientPublicKey",
    "VerifierKeyring",
    "kid_for",
]

KID_SIZE = 8
XWING_SEED_SIZE = 32
XWING_PUBLIC_KEY_SIZE = 1216  # ML-KEM-768 ek (1,184) || X25519 (32)


def kid_for(public_key: bytes) -> bytes:
    """Key id: the first 8 bytes of SHA-256(raw public key)."""
    return hashlib.sha256(public_key).digest()[:KID_SIZE]


# ----------------------------------------------------------------------------- ML-DSA identity


class GatewayIdentity:
    """The gateway's ML-DSA-65 signing key, loaded from its 32-byte seed."""

    def __init__(self, seed: bytes, backend: PQBackend | None = None) -> None:
        if len(seed) != MLDSA65_SEED_SIZE:
            raise ValueError(f"ML-DSA-65 seed must be {MLDSA65_SEED_SIZE} bytes")
        self.seed = bytes(seed)
        self.backend = backend or default_backend()
        self._signer = self.backend.mldsa65_signer(self.seed)
        self.public_key: bytes = self._signer.public_key
        self.kid: bytes = kid_for(self.public_key)

    @classmethod
    def generate(cls, backend: PQBackend | None = None) -> GatewayIdentity:
        """A new identity from 32 bytes of ``os.urandom``."""
        return cls(os.urandom(MLDSA65_SEED_SIZE), backend)

    def sign(self, message: bytes) -> bytes:
        """Pure ML-DSA-65 signature (empty context) over ``message``."""
        return self._signer.sign(message)

    def public(self) -> IdentityPublicKey:
        """The public half."""
        return IdentityPublicKey(self.public_key)

    def cose_public_key(self) -> bytes:
        """COSE_Key AKP ``{1: 7, 2: kid, 3: -49, -1: pub}``."""
        return cose.akp_public_key(cose.ALG_ML_DSA_65, self.kid, self.public_key)

    def __repr__(self) -> str:
        return f"GatewayIdentity(kid={self.kid.hex()})"


@dataclass(frozen=True)
class IdentityPublicKey:
    """A gateway's ML-DSA-65 public key."""

    public_key: bytes
    kid: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.public_key) != MLDSA65_PUBLIC_KEY_SIZE:
            raise ValueError(f"ML-DSA-65 public key must be {MLDSA65_PUBLIC_KEY_SIZE} bytes")
        object.__setattr__(self, "kid", kid_for(self.public_key))

    @classmethod
    def from_cose(cls, data: bytes) -> IdentityPublicKey:
        """Parse a COSE_Key AKP with alg -49; the kid must match the key."""
        alg, kid, pub = cose.parse_akp_public_key(data)
        if alg != cose.ALG_ML_DSA_65:
            raise MalformedError(f"COSE_Key: alg {cose.show(alg)} is not ML-DSA-65 (-49)")
        if len(pub) != MLDSA65_PUBLIC_KEY_SIZE:
            raise MalformedError(
                f"COSE_Key: ML-DSA-65 public key must be {MLDSA65_PUBLIC_KEY_SIZE} bytes")
        key = cls(pub)
        if key.kid != kid:
            raise MalformedError("COSE_Key: kid does not match the public key")
        return key

    def cose(self) -> bytes:
        """COSE_Key AKP encoding."""
        return cose.akp_public_key(cose.ALG_ML_DSA_65, self.kid, self.public_key)


class VerifierKeyring:
    """ML-DSA-65 public keys by kid (current and rotated-out identities), with cached verifiers."""

    def __init__(
        self, keys: Iterable[IdentityPublicKey] = (), backend: PQBackend | None = None
    ) -> None:
        self.backend = backend or default_backend()
        self._keys: dict[bytes, IdentityPublicKey] = {}
        self._verifiers: dict[bytes, Verifier] = {}
        for key in keys:
            self.add(key)

    def add(self, key: IdentityPublicKey) -> None:
        """Add (or replace) a public key."""
        self._keys[key.kid] = key
        self._verifiers.pop(key.kid, None)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[IdentityPublicKey]:
        return iter(self._keys.values())

    def verifier(self, kid: bytes) -> Verifier:
        """The verifier for ``kid``; UnknownKeyError if absent."""
        v = self._verifiers.get(kid)
        if v is None:
            key = self._keys.get(kid)
            if key is None:
                raise UnknownKeyError(f"no ML-DSA-65 public key with kid {kid.hex()}")
            v = self._verifiers[kid] = self.backend.mldsa65_verifier(key.public_key)
        return v

    def verify(self, kid: bytes, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` is valid for ``message`` under key ``kid``."""
        return self.verifier(kid).verify(message, signature)


# ----------------------------------------------------------------------------- X-Wing recipient


def _xwing_components(seed: bytes) -> tuple[Any, Any]:
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    expanded = hashlib.shake_256(seed).digest(96)
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64])
    dh = x25519.X25519PrivateKey.from_private_bytes(expanded[64:96])
    return kem, dh


class RecipientKey:
    """A cloud recipient's X-Wing (MLKEM768-X25519) private key, from its 32-byte seed."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != XWING_SEED_SIZE:
            raise ValueError(f"X-Wing seed must be {XWING_SEED_SIZE} bytes")
        from cryptography.hazmat.primitives import hpke

        self.seed = bytes(seed)
        kem, dh = _xwing_components(self.seed)
        self.hpke_private_key = hpke.MLKEM768X25519PrivateKey(kem, dh)
        self.public_key: bytes = (
            kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
        )
        self.kid: bytes = kid_for(self.public_key)

    @classmethod
    def generate(cls) -> RecipientKey:
        """A new key from 32 bytes of ``os.urandom``."""
        return cls(os.urandom(XWING_SEED_SIZE))

    def public(self) -> RecipientPublicKey:
        """The public half (what a gateway or device needs)."""
        return RecipientPublicKey(self.public_key)

    def __repr__(self) -> str:
        return f"RecipientKey(kid={self.kid.hex()})"


class RecipientPublicKey:
    """An X-Wing public key: ML-KEM-768 encapsulation key (1,184 B) || X25519 key (32 B)."""

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != XWING_PUBLIC_KEY_SIZE:
            raise ValueError(f"X-Wing public key must be {XWING_PUBLIC_KEY_SIZE} bytes")
        from cryptography.hazmat.primitives import hpke
        from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

        self.public_key = bytes(public_key)
        self.kid = kid_for(self.public_key)
        try:
            self.hpke_public_key = hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.public_key[:1184]),
                x25519.X25519PublicKey.from_public_bytes(self.public_key[1184:]),
            )
        except ValueError as exc:
            raise MalformedError(f"X-Wing public key rejected: {exc}") from None

    @classmethod
    def from_cose(cls, data: bytes) -> RecipientPublicKey:
        """Parse a COSE_Key AKP with alg HPKE-9; the kid must match the key."""
        alg, kid, pub = cose.parse_akp_public_key(data)
        if alg != cose.ALG_HPKE_9:
            raise MalformedError(
                f"COSE_Key: alg {cose.show(alg)} is not HPKE-9 ({cose.ALG_HPKE_9})")
        if len(pub) != XWING_PUBLIC_KEY_SIZE:
            raise MalformedError("COSE_Key: X-Wing public key must be 1216 bytes")
        key = cls(pub)
        if key.kid != kid:
            raise MalformedError("COSE_Key: kid does not match the public key")
        return key

    def cose(self) -> bytes:
        """COSE_Key AKP ``{1: 7, 2: kid, 3: 56 (HPKE-9), -1: pub}``."""
        return cose.akp_public_key(cose.ALG_HPKE_9, self.kid, self.public_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientPublicKey) and other.public_key == self.public_key

    def __hash__(self) -> int:
        return hash(self.public_key)

    def __repr__(self) -> str:
        return f"RecipientPublicKey(kid={self.kid.hex()})"


class RecipientKeyring(Mapping[bytes, RecipientKey]):
    """Recipient private keys by kid: the active one plus rotated-out keys kept for old data."""

    def __init__(self, keys: Iterable[RecipientKey] = ()) -> None:
        self._keys: dict[bytes, RecipientKey] = {}
        for key in keys:
            self._keys[key.kid] = key

    def add(self, key: RecipientKey) -> None:
        """Add a key (e.g. after a rotation)."""
        self._keys[key.kid] = key

    def __getitem__(self, kid: bytes) -> RecipientKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
