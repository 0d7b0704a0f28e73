"""Error types of the post-quantum crypto layer (one hierarchy, all subclasses of CryptoError)."""

from __future__ import annotations

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


class CryptoError(Exception):
    """Base class of every error raised by ``rapidmq_edge.crypto``."""


class BackendUnavailable(CryptoError):
    """No installed library offers the requested post-quantum algorithm."""


class KeyFileError(CryptoError):
    """A key file is missing, unreadable, of the wrong kind, or the passphrase is wrong."""


class UnknownKeyError(CryptoError):
    """A key id (kid) is not in the keyring."""


class TamperedError(CryptoError):
    """Authentication failed: the data was modified, truncated or forged."""


class MalformedError(TamperedError):
    """The bytes are not a well-formed structure of the expected kind (a form of tampering)."""


class UnknownSessionError(CryptoError):
    """A sealed message names a session whose header the opener has not seen."""


class WrongRecipientError(CryptoError):
    """A session header or device envelope is addressed to a key this keyring does not hold."""


class ReplayError(CryptoError):
    """A sequence number was already accepted, or is older than the replay window."""


class SignatureError(CryptoError):
    """An ML-DSA signature does not verify."""


class BatchError(CryptoError):
    """A batch header is invalid (bad signature, wrong shape, leaves not matching the root)."""
