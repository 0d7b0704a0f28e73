"""Post-quantum protection of forwarded data (issue 5): keys, envelopes, signed Merkle batches.

Everything here is sans-I/O except :mod:`.keystore` (key files) and :mod:`.batchlog` (SQLite
chain). Public API, by module:

* :mod:`.backend` — ``default_backend()``, ``get_backend(name)``: ML-DSA-65 / ML-KEM-768 over
  ``cryptography`` or ``pqcrypto``.
* :mod:`.keys` — ``GatewayIdentity``, ``IdentityPublicKey``, ``VerifierKeyring``,
  ``RecipientKey``, ``RecipientPublicKey``, ``RecipientKeyring``, ``kid_for``.
* :mod:`.keystore` — ``KeyStore`` (``data_dir/keys``).
* :mod:`.envelope` — ``Sealer`` (gateway) / ``Opener`` (cloud) for per-message AEAD sessions.
* :mod:`.e2e` — ``seal_for_recipient`` / ``open_device_message`` (device single-shot HPKE).
* :mod:`.merkle` — RFC 9162 tree hash and inclusion proofs.
* :mod:`.batch` — ``BatchBuilder``, ``verify_batch``, ``verify_chain``, ``message_leaf``.
* :mod:`.batchlog` — ``BatchLog`` (durable chain store), ``read_chain``.
* :mod:`.errors` — ``CryptoError`` and its subclasses.

See docs/crypto.md for the design, wire formats, threat model and test vectors.
"""

from .errors import (
    BackendUnavailable,
    BatchError,
    CryptoError,
    KeyFileError,
    MalformedError,
    ReplayError,
    SignatureError,
    TamperedError,
    UnknownKeyError,
    UnknownSessionError,
    WrongRecipientError,
)

__all__ = [
    "BackendUnavailable",
    "BatchError",
    "CryptoError",
    "KeyFileError",
    "MalformedError",
    "ReplayError",
    "SignatureError",
    "TamperedError",
    "UnknownKeyError",
    "UnknownSessionError",
    "WrongRecipientError",
]
