"""One small interface over the post-quantum primitives, with two implementations.

* :class:`CryptographyBackend` — ``cryptography`` (OpenSSL >= 3.5): keys from 32/64-byte seeds,
  fast signing. Preferred whenever its OpenSSL offers ML-DSA and ML-KEM.
* :class:`PqcryptoBackend` — ``pqcrypto`` (PQClean), optional; used where the installed
  ``cryptography`` lacks ML-DSA/ML-KEM. pqcrypto only takes *expanded* private keys, so seeds are
  expanded with the FIPS 203/204 ``KeyGen_internal`` of ``kyber-py`` / ``dilithium-py`` (pure
  Python, installed with the ``pq`` extra). Without them it can still verify and encapsulate.

Seeds are what we store (RFC 9964 AKP ``priv``, draft-ietf-hpke-pq ``Nsk``): 32 bytes for
ML-DSA-65 (xi), 64 bytes for ML-KEM-768 (d || z). All signatures use the pure (non-prehash)
ML-DSA with the empty context string, as RFC 9964 requires.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Protocol

from .errors import BackendUnavailable

__all__ = [
    "MLDSA65_PUBLIC_KEY_SIZE",
    "MLDSA65_SEED_SIZE",
    "MLDSA65_SIGNATURE_SIZE",
    "MLKEM768_CIPHERTEXT_SIZE",
    "MLKEM768_PUBLIC_KEY_SIZE",
    "MLKEM768_SEED_SIZE",
    "CryptographyBackend",
    "KemDecapsulator",
    "PQBackend",
    "PqcryptoBackend",
    "Signer",
    "Verifier",
    "available_backends",
    "default_backend",
    "get_backend",
]

MLDSA65_SEED_SIZE = 32
MLDSA65_PUBLIC_KEY_SIZE = 1952
MLDSA65_SIGNATURE_SIZE = 3309
MLKEM768_SEED_SIZE = 64
MLKEM768_PUBLIC_KEY_SIZE = 1184
MLKEM768_CIPHERTEXT_SIZE = 1088

#: environment variable that forces a backend ("cryptography" or "pqcrypto")
BACKEND_ENV = "RAPIDMQ_PQ_BACKEND"


class Signer(Protocol):
    """An ML-DSA-65 private key loaded from its seed."""

    @property
    def public_key(self) -> bytes: ...
    def sign(self, message: bytes) -> bytes: ...


class Verifier(Protocol):
    """An ML-DSA-65 public key ready to verify."""

    def verify(self, message: bytes, signature: bytes) -> bool: ...


class KemDecapsulator(Protocol):
    """An ML-KEM-768 decapsulation key loaded from its seed."""

    @property
    def public_key(self) -> bytes: ...
    def decapsulate(self, ciphertext: bytes) -> bytes: ...


class PQBackend(Protocol):
    """The operations the crypto layer needs from a post-quantum library."""

    name: str

    def mldsa65_signer(self, seed: bytes) -> Signer:
        """Load an ML-DSA-65 signing key from its 32-byte seed."""
        ...

    def mldsa65_verifier(self, public_key: bytes) -> Verifier:
        """Parse a 1,952-byte ML-DSA-65 public key."""
        ...

    def mlkem768_decapsulator(self, seed: bytes) -> KemDecapsulator:
        """Load an ML-KEM-768 decapsulation key from its 64-byte seed (d || z)."""
        ...

    def mlkem768_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Encapsulate to a 1,184-byte public key; returns ``(ciphertext, shared_secret)``."""
        ...


def _check_len(data: bytes, size: int, what: str) -> bytes:
    if len(data) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(data)}")
    return bytes(data)


# ----------------------------------------------------------------------------- cryptography


class _CgSigner:
    def __init__(self, key: Any) -> None:
        self._key = key
        self._pub: bytes = key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self._pub

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message))


class _CgVerifier:
    def __init__(self, key: Any) -> None:
        self._key = key

    def verify(self, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class _CgDecapsulator:
    def __init__(self, key: Any) -> None:
        self._key = key
        self._pub: bytes = key.public_key().public_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self._pub

    def decapsulate(self, ciphertext: bytes) -> bytes:
        _check_len(ciphertext, MLKEM768_CIPHERTEXT_SIZE, "ML-KEM-768 ciphertext")
        return bytes(self._key.decapsulate(ciphertext))


class CryptographyBackend:
    """ML-DSA-65 / ML-KEM-768 from ``cryptography`` (OpenSSL 3.5+)."""

    name = "cryptography"

    def __init__(self) -> None:
        try:
            from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem
        except ImportError as exc:  # cryptography < 47
            raise BackendUnavailable(f"cryptography has no ML-DSA/ML-KEM: {exc}") from None
        self._mldsa = mldsa
        self._mlkem = mlkem

    @staticmethod
    def supported() -> bool:
        """True if the installed cryptography/OpenSSL can do ML-DSA-65 and ML-KEM-768."""
        try:
            from cryptography.hazmat.primitives.asymmetric import mldsa, mlkem

            mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes(MLDSA65_SEED_SIZE))
            mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes(MLKEM768_SEED_SIZE))
        except Exception:  # ImportError, UnsupportedAlgorithm
            return False
        return True

    def mldsa65_signer(self, seed: bytes) -> Signer:
        """Load an ML-DSA-65 signing key from its 32-byte seed."""
        _check_len(seed, MLDSA65_SEED_SIZE, "ML-DSA-65 seed")
        return _CgSigner(self._mldsa.MLDSA65PrivateKey.from_seed_bytes(seed))

    def mldsa65_verifier(self, public_key: bytes) -> Verifier:
        """Parse a 1,952-byte ML-DSA-65 public key."""
        _check_len(public_key, MLDSA65_PUBLIC_KEY_SIZE, "ML-DSA-65 public key")
        return _CgVerifier(self._mldsa.MLDSA65PublicKey.from_public_bytes(public_key))

    def mlkem768_decapsulator(self, seed: bytes) -> KemDecapsulator:
        """Load an ML-KEM-768 decapsulation key from its 64-byte seed."""
        _check_len(seed, MLKEM768_SEED_SIZE, "ML-KEM-768 seed")
        return _CgDecapsulator(self._mlkem.MLKEM768PrivateKey.from_seed_bytes(seed))

    def mlkem768_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Encapsulate; returns ``(ciphertext, shared_secret)``."""
        _check_len(public_key, MLKEM768_PUBLIC_KEY_SIZE, "ML-KEM-768 public key")
        shared, ciphertext = self._mlkem.MLKEM768PublicKey.from_public_bytes(
            public_key
        ).encapsulate()
        return bytes(ciphertext), bytes(shared)


# ----------------------------------------------------------------------------- pqcrypto


class _PqSigner:
    def __init__(self, mod: Any, public_key: bytes, secret_key: bytes) -> None:
        self._mod = mod
        self._pub = public_key
        self._sk = secret_key

    @property
    def public_key(self) -> bytes:
        return self._pub

    def sign(self, message: bytes) -> bytes:
        return bytes(self._mod.sign(self._sk, message))


class _PqVerifier:
    def __init__(self, mod: Any, public_key: bytes) -> None:
        self._mod = mod
        self._pub = public_key

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != MLDSA65_SIGNATURE_SIZE:
            return False
        try:
            self._mod.verify(self._pub, message, signature)
        except Exception:  # pqcrypto raises its own InvalidSignatureError (and ValueError)
            return False
        return True


class _PqDecapsulator:
    def __init__(self, mod: Any, public_key: bytes, secret_key: bytes) -> None:
        self._mod = mod
        self._pub = public_key
        self._sk = secret_key

    @property
    def public_key(self) -> bytes:
        return self._pub

    def decapsulate(self, ciphertext: bytes) -> bytes:
        _check_len(ciphertext, MLKEM768_CIPHERTEXT_SIZE, "ML-KEM-768 ciphertext")
        return bytes(self._mod.decaps(self._sk, ciphertext))


class PqcryptoBackend:
    """ML-DSA-65 / ML-KEM-768 from ``pqcrypto`` (PQClean); seeds expanded per FIPS 203/204."""

    name = "pqcrypto"

    def __init__(self) -> None:
        try:
            from pqcrypto.kem import ml_kem_768  # type: ignore[import-not-found]
            from pqcrypto.sign import ml_dsa_65  # type: ignore[import-not-found]
        except ImportError as exc:
            raise BackendUnavailable(f"pqcrypto is not installed: {exc}") from None
        self._dsa = ml_dsa_65
        self._kem = ml_kem_768

    @staticmethod
    def supported() -> bool:
        """True if pqcrypto (>= 1.0, the FIPS 203/204 API) is importable."""
        try:
            PqcryptoBackend()
        except BackendUnavailable:
            return False
        return True

    @staticmethod
    def _expand_dsa(seed: bytes) -> tuple[bytes, bytes]:
        try:
            from dilithium_py.ml_dsa import ML_DSA_65  # type: ignore[import-not-found]
        except ImportError:
            raise BackendUnavailable(
                "pqcrypto backend: expanding an ML-DSA seed needs dilithium-py "
                "(pip install 'rapidmq-edge[pq]')"
            ) from None
        pk, sk = ML_DSA_65.key_derive(seed)
        return bytes(pk), bytes(sk)

    @staticmethod
    def _expand_kem(seed: bytes) -> tuple[bytes, bytes]:
        try:
            from kyber_py.ml_kem import ML_KEM_768  # type: ignore[import-not-found]
        except ImportError:
            raise BackendUnavailable(
                "pqcrypto backend: expanding an ML-KEM seed needs kyber-py "
                "(pip install 'rapidmq-edge[pq]')"
            ) from None
        ek, dk = ML_KEM_768.key_derive(seed)
        return bytes(ek), bytes(dk)

    def mldsa65_signer(self, seed: bytes) -> Signer:
        """Expand the 32-byte seed (FIPS 204 KeyGen_internal) and sign with PQClean."""
        _check_len(seed, MLDSA65_SEED_SIZE, "ML-DSA-65 seed")
        pk, sk = _expand_dsa_cached(seed)
        return _PqSigner(self._dsa, pk, sk)

    def mldsa65_verifier(self, public_key: bytes) -> Verifier:
        """Wrap a 1,952-byte ML-DSA-65 public key."""
        return _PqVerifier(self._dsa, _check_len(public_key, MLDSA65_PUBLIC_KEY_SIZE, "public key"))

    def mlkem768_decapsulator(self, seed: bytes) -> KemDecapsulator:
        """Expand the 64-byte seed (FIPS 203 KeyGen_internal) and decapsulate with PQClean."""
        _check_len(seed, MLKEM768_SEED_SIZE, "ML-KEM-768 seed")
        ek, dk = self._expand_kem(seed)
        return _PqDecapsulator(self._kem, ek, dk)

    def mlkem768_encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        """Encapsulate; returns ``(ciphertext, shared_secret)``."""
        _check_len(public_key, MLKEM768_PUBLIC_KEY_SIZE, "ML-KEM-768 public key")
        ciphertext, shared = self._kem.encaps(public_key)
        return bytes(ciphertext), bytes(shared)


@functools.lru_cache(maxsize=16)
def _expand_dsa_cached(seed: bytes) -> tuple[bytes, bytes]:
    # pure-Python expansion costs ~20 ms; a gateway reloads the same identity often
    return PqcryptoBackend._expand_dsa(seed)


# ----------------------------------------------------------------------------- selection

_BACKENDS: dict[str, type[CryptographyBackend] | type[PqcryptoBackend]] = {
    "cryptography": CryptographyBackend,
    "pqcrypto": PqcryptoBackend,
}


def available_backends() -> list[str]:
    """Names of the backends usable here, preferred first."""
    return [name for name, cls in _BACKENDS.items() if cls.supported()]


@functools.lru_cache(maxsize=4)
def get_backend(name: str) -> PQBackend:
    """The backend called ``name`` ("cryptography" or "pqcrypto"); BackendUnavailable if absent."""
    cls = _BACKENDS.get(name)
    if cls is None:
        raise BackendUnavailable(f"unknown backend {name!r}; choose from {sorted(_BACKENDS)}")
    if not cls.supported():
        raise BackendUnavailable(f"backend {name!r} is not usable on this system")
    return cls()


def default_backend() -> PQBackend:
    """``$RAPIDMQ_PQ_BACKEND`` if set, else cryptography when its OpenSSL has ML-DSA/ML-KEM,
    else pqcrypto; BackendUnavailable when neither works."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        return get_backend(forced)
    names = available_backends()
    if not names:
        raise BackendUnavailable(
            "no post-quantum backend: need cryptography >= 47 linked to OpenSSL >= 3.5, "
            "or pqcrypto >= 1.0"
        )
    return get_backend(names[0])
