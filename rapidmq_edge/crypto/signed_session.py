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

import cbor2

from . import cose
from .errors import MalformedError, SignatureError
from .keys import KID_SIZE, GatewayIdentity, VerifierKeyring

__all__ = ["SESSION_SIGNATURE_AAD", "is_signed_session", "open_signed_session", "sign_session"]

SESSION_SIGNATURE_AAD = b"rmq-session/1"
_TAG18 = b"\xd2"  # CBOR tag 18 (COSE_Sign1), one byte


def is_signed_session(data: bytes) -> bool:
    """True if ``data`` is a COSE_Sign1 (a signed session header), not a bare one (tag 16)."""
    return data[:1] == _TAG18


def sign_session(header: bytes, identity: GatewayIdentity) -> bytes:
    """COSE_Sign1 (ML-DSA-65, kid = identity kid) carrying ``header`` as its payload."""
    protected = cose.dumps({cose.HDR_ALG: cose.ALG_ML_DSA_65, cose.HDR_KID: identity.kid})
    signature = identity.sign(cose.sig_structure(protected, header, SESSION_SIGNATURE_AAD))
    return cose.dumps(cbor2.CBORTag(cose.TAG_COSE_SIGN1, [protected, {}, header, signature]))


def open_signed_session(data: bytes, keyring: VerifierKeyring) -> tuple[bytes, bytes]:
    """Verify a signed session header: ``(session header, signer kid)``.

    Raises MalformedError, UnknownKeyError (kid not in ``keyring``) or SignatureError.
    """
    arr = cose.as_array(
        cose.untag(cose.decode_strict(data, "signed session"), cose.TAG_COSE_SIGN1,
                   "signed session"),
        4, "signed session",
    )
    protected = cose.as_bytes(arr[0], "signed session protected")
    hdr = cose.as_map(cose.decode_strict(protected, "signed session protected"), "protected")
    if hdr.get(cose.HDR_ALG) != cose.ALG_ML_DSA_65:
        raise MalformedError(f"signed session: alg {hdr.get(cose.HDR_ALG)!r} is not ML-DSA-65")
    kid = cose.as_bytes(hdr.get(cose.HDR_KID), "signed session kid", KID_SIZE)
    cose.as_map(arr[1], "signed session unprotected")
    header = cose.as_bytes(arr[2], "signed session payload")
    signature = cose.as_bytes(arr[3], "signed session signature")
    if not keyring.verify(kid, cose.sig_structure(protected, header, SESSION_SIGNATURE_AAD),
                          signature):
        raise SignatureError("session header: ML-DSA-65 signature does not verify")
    return header, kid
