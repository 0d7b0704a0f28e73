"""Session headers signed by the gateway identity (sans-I/O).

A session header (:func:`~rapidmq_edge.crypto.envelope.build_session_header`, HPKE to the
cloud recipient) proves nothing about its sender: anyone holding the recipient's public key
can make one. Signed by the gateway's ML-DSA-65 identity, it does: the session key is then
known only to that gateway and the recipient, so an envelope that authenticates under it
(AES-256-GCM over the payload, with topic, gateway id and message id as associated data)
comes from that gateway, message by message — the "sign the key exchange, MAC the records"
pattern of TLS 1.3 and SIGMA. This is what lets a consumer verify each encrypted message on
its own while the batch message lists only ids (``manifest = "auto"``, docs/crypto.md).

Wire format (CBOR diagnostic notation)::

    signed session = 18([<< {1: -49, 4: kid} >>, {}, << session header >>, signature])

with the COSE ``Sig_structure`` external AAD ``"rmq-session/1"``, so a signature over a
session header can never be taken for one over a batch header (and vice versa).
"""

from __future__ import annotations

from . import cose
from .errors import SignatureError
from .keys import KID_SIZE, GatewayIdentity, VerifierKeyring

__all__ = ["SESSION_SIGNATURE_AAD", "is_signed_session", "open_signed_session", "sign_session"]

SESSION_SIGNATURE_AAD = b"rmq-session/1"
_TAG18 = b"\xd2"  # CBOR tag 18 (COSE_Sign1), one byte


def is_signed_session(data: bytes) -> bool:
    """True if ``data`` is a COSE_Sign1 (a signed session header), not a bare one (tag 16)."""
    return data[:1] == _TAG18


def sign_session(header: bytes, identity: GatewayIdentity) -> bytes:
    """COSE_Sign1 (ML-DSA-65, kid = identity kid) carrying ``header`` as its payload."""
    return cose.sign1_ml_dsa_65(header, identity.kid, identity.sign, SESSION_SIGNATURE_AAD)


def open_signed_session(data: bytes, keyring: VerifierKeyring) -> tuple[bytes, bytes]:
    """Verify a signed session header: ``(session header, signer kid)``.

    Raises MalformedError, UnknownKeyError (kid not in ``keyring``) or SignatureError.
    """
    kid, protected, header, signature = cose.parse_sign1_ml_dsa_65(data, "signed session",
                                                                   KID_SIZE)
    if not keyring.verify(kid, cose.sig_structure(protected, header, SESSION_SIGNATURE_AAD),
                          signature):
        raise SignatureError("session header: ML-DSA-65 signature does not verify")
    return header, kid
