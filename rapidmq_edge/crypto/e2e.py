"""Device-side end-to-end encryption: single-shot HPKE-9 to the cloud recipient (issue item 6).

A device seals each payload so that only the cloud consumer can read it; the gateway forwards
bytes it cannot decrypt (routing uses the topic and metadata only). Format — COSE_Encrypt0 in
COSE-HPKE *integrated encryption* mode (draft-ietf-cose-hpke), tag 16::

    16([<< {1: 56, 4: recipient kid} >>, {-4: enc (1,120 B)}, ciphertext])

HPKE info = Enc_structure ["Encrypt0", protected, context]; ``context`` is what both ends know
and want bound (e.g. ``device_context(device_id, topic)``). Cost: about 1.16 KB and 100 µs per
message, so use it for sporadic messages; frequent senders should run a :class:`Sealer` session.
"""

from __future__ import annotations

import cbor2

from . import cose
from .errors import MalformedError, WrongRecipientError
from .hpke_suite import hpke_open, hpke_seal
from .keys import KID_SIZE, RecipientKeyring, RecipientPublicKey

__all__ = ["device_context", "is_device_envelope", "open_device_message", "seal_for_recipient"]


def device_context(device_id: str, topic: str) -> bytes:
    """Canonical context binding a device id and its (device-side) topic."""
    return cose.dumps(["rapidmq-edge device v1", device_id, topic])


def seal_for_recipient(
    recipient: RecipientPublicKey, plaintext: bytes, context: bytes = b""
) -> bytes:
    """Encrypt ``plaintext`` to ``recipient`` (fresh X-Wing encapsulation per call)."""
    protected = cose.dumps({cose.HDR_ALG: cose.ALG_HPKE_9, cose.HDR_KID: recipient.kid})
    enc, ct = hpke_seal(
        recipient.hpke_public_key, plaintext, cose.enc_structure(protected, context)
    )
    return cose.dumps(cbor2.CBORTag(cose.TAG_COSE_ENCRYPT0, [protected, {cose.HDR_EK: enc}, ct]))


def _parse(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    arr = cose.as_array(
        cose.untag(
            cose.decode_strict(data, "device envelope"), cose.TAG_COSE_ENCRYPT0, "device envelope"
        ),
        3,
        "device envelope",
    )
    protected = cose.as_bytes(arr[0], "device envelope protected")
    hdr = cose.as_map(cose.decode_strict(protected, "device envelope protected"), "protected")
    if hdr.get(cose.HDR_ALG) != cose.ALG_HPKE_9 or "sid" in hdr:
        raise MalformedError("device envelope: alg is not HPKE-9")
    kid = cose.as_bytes(hdr.get(cose.HDR_KID), "device envelope kid", KID_SIZE)
    enc = cose.as_bytes(cose.as_map(arr[1], "unprotected").get(cose.HDR_EK), "device envelope ek")
    return protected, kid, enc, cose.as_bytes(arr[2], "device envelope ciphertext")


def is_device_envelope(data: bytes) -> bool:
    """True if ``data`` parses as a device (single-shot HPKE) envelope."""
    try:
        _parse(data)
    except MalformedError:
        return False
    return True


def open_device_message(keyring: RecipientKeyring, data: bytes, context: bytes = b"") -> bytes:
    """Decrypt a device envelope; WrongRecipientError, MalformedError or TamperedError."""
    protected, kid, enc, ct = _parse(data)
    key = keyring.get(kid)
    if key is None:
        raise WrongRecipientError(
            f"device envelope is for recipient kid {kid.hex()}, not held here"
        )
    return hpke_open(key.hpke_private_key, enc, ct, cose.enc_structure(protected, context))
