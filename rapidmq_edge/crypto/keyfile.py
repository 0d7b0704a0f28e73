"""Key file encodings (sans-I/O: bytes in, bytes out).

* ML-DSA-65 identity: **PKCS#8 PEM** in the seed form (RFC 9881 / OpenSSL), optionally encrypted
  with cryptography's ``BestAvailableEncryption`` (PBES2). ``openssl pkey`` reads it.
* X-Wing seeds (no PKCS#8 support in the libraries), and ML-DSA seeds where ``cryptography`` has
  no ML-DSA: a **CBOR seed file**::

      {"v": 1, "alg": "X-Wing" | "ML-DSA-65", "seed": h'..32 bytes..'}                  plain
      {"v": 1, "alg": ..., "kdf": {"name": "scrypt", "n": 32768, "r": 8, "p": 1,
                                   "salt": h'..16..'},
       "nonce": h'..12..', "ct": h'..48..'}                                              encrypted

  ``ct = AES-256-GCM(key = scrypt(passphrase, salt, n, r, p, 32), nonce, seed,
  aad = CBOR ["rapidmq-edge seed v1", alg])``.
"""

from __future__ import annotations

import os

from . import cose
from .errors import KeyFileError, MalformedError

__all__ = ["ALG_MLDSA65", "ALG_XWING", "decode_seed_file", "encode_seed_file", "is_encrypted"]

ALG_MLDSA65 = "ML-DSA-65"
ALG_XWING = "X-Wing"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**15, 8, 1
_PEM_ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
_PEM_PLAIN = b"-----BEGIN PRIVATE KEY-----"


def _aad(alg: str) -> bytes:
    return cose.dumps(["rapidmq-edge seed v1", alg])


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _pkcs8_supported() -> bool:
    try:
        from cryptography.hazmat.primitives.asymmetric import mldsa

        mldsa.MLDSA65PrivateKey.from_seed_bytes(bytes(32))
    except Exception:
        return False
    return True


def encode_seed_file(alg: str, seed: bytes, passphrase: bytes | None = None) -> bytes:
    """Serialise a seed: PKCS#8 PEM for ML-DSA-65 when supported, else the CBOR seed file."""
    if alg == ALG_MLDSA65 and _pkcs8_supported():
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric import mldsa

        key = mldsa.MLDSA65PrivateKey.from_seed_bytes(seed)
        enc: ser.KeySerializationEncryption = (
            ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption()
        )
        return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, enc)
    if alg not in (ALG_MLDSA65, ALG_XWING):
        raise ValueError(f"unknown key algorithm {alg!r}")
    if not passphrase:
        return cose.dumps({"v": 1, "alg": alg, "seed": seed})
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = os.urandom(16), os.urandom(12)
    wrap_key = _scrypt(passphrase, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    ct = AESGCM(wrap_key).encrypt(nonce, seed, _aad(alg))
    kdf = {"name": "scrypt", "n": _SCRYPT_N, "r": _SCRYPT_R, "p": _SCRYPT_P, "salt": salt}
    return cose.dumps({"v": 1, "alg": alg, "kdf": kdf, "nonce": nonce, "ct": ct})


def is_encrypted(data: bytes) -> bool:
    """True if the key file needs a passphrase."""
    if data.startswith(_PEM_ENCRYPTED):
        return True
    if data.startswith(b"-----"):
        return False
    try:
        obj = cose.decode_strict(data, "seed file")
    except MalformedError:
        return False
    return isinstance(obj, dict) and "ct" in obj


def decode_seed_file(data: bytes, alg: str, passphrase: bytes | None = None) -> bytes:
    """The seed inside a key file; KeyFileError on a wrong kind, missing or wrong passphrase."""
    if data.startswith((_PEM_ENCRYPTED, _PEM_PLAIN)):
        if alg != ALG_MLDSA65:
            raise KeyFileError(f"PKCS#8 file where an {alg} seed file was expected")
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization as ser
        from cryptography.hazmat.primitives.asymmetric import mldsa

        if data.startswith(_PEM_ENCRYPTED) and not passphrase:
            raise KeyFileError("key file is passphrase-encrypted; no passphrase given")
        try:
            key = ser.load_pem_private_key(
                data, passphrase if data.startswith(_PEM_ENCRYPTED) else None
            )
        except UnsupportedAlgorithm as exc:  # a PKCS#8 key of a type the library lacks
            raise KeyFileError(f"PKCS#8 key of an unsupported type: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"cannot load PKCS#8 key (wrong passphrase?): {exc}") from None
        if not isinstance(key, mldsa.MLDSA65PrivateKey):
            raise KeyFileError(f"PKCS#8 key is {type(key).__name__}, not ML-DSA-65")
        return bytes(key.private_bytes_raw())
    try:
        obj = cose.as_map(cose.decode_strict(data, "seed file"), "seed file")
    except MalformedError as exc:
        raise KeyFileError(str(exc)) from None
    if obj.get("v") != 1 or obj.get("alg") != alg:
        raise KeyFileError(f"seed file holds {cose.show(obj.get('alg'))} "
                           f"(v={cose.show(obj.get('v'))}), not {alg}")
    if "seed" in obj:
        seed = obj["seed"]
    else:
        if not passphrase:
            raise KeyFileError("key file is passphrase-encrypted; no passphrase given")
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            kdf = obj["kdf"]
            if kdf["name"] != "scrypt":
                raise KeyFileError(f"unsupported KDF {kdf['name']!r}")
            wrap_key = _scrypt(passphrase, kdf["salt"], kdf["n"], kdf["r"], kdf["p"])
            seed = AESGCM(wrap_key).decrypt(obj["nonce"], obj["ct"], _aad(alg))
        except InvalidTag:
            raise KeyFileError("wrong passphrase (or the key file was modified)") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"malformed encrypted seed file: {exc}") from None
    if not isinstance(seed, bytes) or len(seed) != 32:
        raise KeyFileError("seed must be 32 bytes")
    return seed
