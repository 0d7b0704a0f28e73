"""Fuzz the CBOR/COSE parsers of the crypto layer: signed batch headers, batch messages,
signed and bare session headers, envelopes, COSE_Key public keys and seed files.

Input: one mode byte (``byte % 8``), then the structure under test. The keys are fixed
(:data:`IDENTITY_SEED`, :data:`RECIPIENT_SEED`), so seeds made with them verify and
decrypt and the fuzzer starts from the accepting paths.

Invariants (every mode): only :class:`~rapidmq_edge.crypto.errors.CryptoError` (and
subclasses) escape; what parses survives a round trip through its encoder.

* 0 signed batch header: ``parse_signed_header`` then ``verify_batch``; the header
  re-encodes to its payload's value (``BatchHeader.decode(h.encode()) == h``).
* 1 batch message ``[COSE_Sign1, id runs, leaves]``: ``decode_batch_message``, at most
  ``MAX_BATCH_IDS`` ids; increasing ids survive ``runs_to_ids(id_runs(ids))``; the header
  inside goes through mode 0.
* 2 signed session header: ``open_signed_session``; a verified header goes through mode 3.
* 3 session header: ``parse_session_header`` and ``Opener.add_session`` (HPKE open).
* 4 envelope: ``parse_envelope``; ``encode_envelope`` of its parts gives the same parts.
* 5 a session header and an envelope (2-byte length of the header first):
  ``Opener.open``; an envelope that opens is refused as a replay the second time.
* 6 COSE_Key: ``parse_akp_public_key``, ``IdentityPublicKey.from_cose``,
  ``RecipientPublicKey.from_cose``; an accepted key re-exports to an equal key.
* 7 key file: ``is_encrypted`` never raises; ``decode_seed_file`` (no passphrase) raises
  only ``KeyFileError``.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from rapidmq_edge.crypto import (
        batch,
        batch_message,
        cose,
        envelope,
        keyfile,
        keys,
        signed_session,
    )
    from rapidmq_edge.crypto.errors import CryptoError, KeyFileError, ReplayError

__all__ = ["IDENTITY_SEED", "RECIPIENT_SEED", "check", "main"]

TARGET = "cose"
#: the gateway identity (ML-DSA-65 seed) the seeds are signed with
IDENTITY_SEED = bytes(range(32))
#: the cloud recipient (X-Wing seed) the seeds are sealed to
RECIPIENT_SEED = bytes(range(32, 64))
#: topic and message id the envelope seeds are sealed with (mode 5)
TOPIC, MESSAGE_ID = "fuzz/t", "gw:1"


@functools.cache
def identity() -> keys.GatewayIdentity:
    """The fixed gateway identity."""
    return keys.GatewayIdentity(IDENTITY_SEED)


@functools.cache
def verifiers() -> keys.VerifierKeyring:
    """A keyring holding the fixed identity's public key."""
    return keys.VerifierKeyring([identity().public()])


@functools.cache
def recipient() -> keys.RecipientKey:
    """The fixed recipient key."""
    return keys.RecipientKey(RECIPIENT_SEED)


def _crypto(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None when it raised a CryptoError."""
    try:
        return fn(*args)
    except CryptoError:
        return None


def check_signed_header(data: bytes) -> None:
    parsed = _crypto(batch.parse_signed_header, data)
    if parsed is None:
        return
    header, kid, _protected, payload, _sig = parsed
    assert len(kid) == keys.KID_SIZE
    assert batch.BatchHeader.decode(header.encode()) == header
    assert batch.BatchHeader.decode(payload) == header
    verified = _crypto(batch.verify_batch, data, verifiers())
    assert verified is None or verified == header


def check_batch_message(data: bytes) -> None:
    parsed = _crypto(batch_message.decode_batch_message, data)
    if parsed is None:
        return
    signed, ids, leaves = parsed
    assert leaves is None or len(leaves) % 32 == 0
    assert len(ids) <= batch_message.MAX_BATCH_IDS
    # id_runs is a per-id Python loop: round-trip the ids of batches of a realistic size
    if len(ids) <= 65536 and all(a < b for a, b in zip(ids, ids[1:], strict=False)):
        assert batch_message.runs_to_ids(batch_message.id_runs(ids)) == ids
    check_signed_header(signed)


def check_signed_session(data: bytes) -> None:
    opened = _crypto(signed_session.open_signed_session, data, verifiers())
    assert signed_session.is_signed_session(data) or opened is None
    if opened is not None:
        header, kid = opened
        assert kid == identity().kid
        check_session_header(header)


def check_session_header(data: bytes) -> None:
    parsed = _crypto(envelope.parse_session_header, data)
    opener = envelope.Opener(keys.RecipientKeyring([recipient()]))
    info = _crypto(opener.add_session, data)
    if parsed is None:
        assert info is None, "a session header that does not parse was accepted"
        return
    if info is not None:
        assert info == parsed[0] and opener.knows(info.session_id)


def check_envelope(data: bytes) -> None:
    parsed = _crypto(envelope.parse_envelope, data)
    if parsed is None:
        return
    sid, piv, seq, ct = parsed
    assert 0 <= seq <= envelope.MAX_SEQ
    assert envelope.parse_envelope(envelope.encode_envelope(sid, piv, ct)) == parsed
    opener = envelope.Opener(keys.RecipientKeyring([recipient()]))
    # no session header was added: the envelope cannot open
    assert _crypto(lambda: opener.open(data, topic=TOPIC, message_id=MESSAGE_ID)) is None


def check_open(data: bytes) -> None:
    if len(data) < 2:
        return
    n = int.from_bytes(data[:2], "big")
    header, env = data[2:2 + n], data[2 + n:]
    opener = envelope.Opener(keys.RecipientKeyring([recipient()]))
    opened = _crypto(lambda: opener.open(env, topic=TOPIC, message_id=MESSAGE_ID,
                                         session_header=header))
    if opened is None:
        return
    assert opened.seq == envelope.parse_envelope(env)[2]
    try:
        opener.open(env, topic=TOPIC, message_id=MESSAGE_ID)
    except ReplayError:
        pass
    else:
        raise AssertionError("the same envelope opened twice")


def check_cose_key(data: bytes) -> None:
    parsed = _crypto(cose.parse_akp_public_key, data)
    if parsed is None:
        return
    alg, kid, pub = parsed
    ident = _crypto(keys.IdentityPublicKey.from_cose, data)
    if ident is not None:
        assert alg == cose.ALG_ML_DSA_65 and ident.kid == kid and ident.public_key == pub
        assert keys.IdentityPublicKey.from_cose(ident.cose()) == ident
    rcpt = _crypto(keys.RecipientPublicKey.from_cose, data)
    if rcpt is not None:
        assert alg == cose.ALG_HPKE_9 and rcpt.kid == kid and rcpt.public_key == pub
        assert keys.RecipientPublicKey.from_cose(rcpt.cose()) == rcpt


def check_key_file(data: bytes) -> None:
    keyfile.is_encrypted(data)
    for alg in (keyfile.ALG_MLDSA65, keyfile.ALG_XWING):
        try:
            seed = keyfile.decode_seed_file(data, alg, None)
        except KeyFileError:
            continue
        assert isinstance(seed, bytes) and len(seed) == 32


_MODES = (
    check_signed_header, check_batch_message, check_signed_session, check_session_header,
    check_envelope, check_open, check_cose_key, check_key_file,
)


def check(data: bytes) -> None:
    """Raise (AssertionError or the escaping exception) when an invariant breaks."""
    if not data:
        return
    _MODES[data[0] % len(_MODES)](data[1:])


def main() -> None:
    """Run under atheris: ``python -m fuzz.cose [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
