"""The optional C accelerator computes exactly what the pure-Python path computes.

``make test`` installs a compiler and OpenSSL's headers, so the extension is built here; a
silently skipped build would make these checks (and the benchmarks) meaningless, hence the
first test.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rapidmq_edge.crypto import accel
from rapidmq_edge.crypto.batch import BatchBuilder, verify_batch
from rapidmq_edge.crypto.envelope import (
    Opener,
    Sealer,
    SessionKeys,
    _piv,
    encode_envelope,
    message_aad,
    tstr,
)
from rapidmq_edge.crypto.keys import (
    GatewayIdentity,
    RecipientKey,
    RecipientKeyring,
    VerifierKeyring,
)
from rapidmq_edge.crypto.merkle import MerkleTree

FAST = accel.FASTPATH


def test_the_extension_is_built_and_in_use() -> None:
    assert FAST is not None, "rapidmq_edge/crypto/_fastpath.c was not built (gcc, libssl-dev?)"
    assert accel.leaf is FAST.leaf and accel.merkle_root is FAST.merkle_root


def test_merkle_root_and_leaf_match_the_python_definitions() -> None:
    assert FAST is not None
    rnd = random.Random(7)
    for n in [*range(0, 70), 255, 256, 257, 1023, 1024, 1025]:
        leaves = [rnd.randbytes(32) for _ in range(n)]
        assert FAST.merkle_root(b"".join(leaves)) == MerkleTree(leaves).root, n
    for size in (0, 1, 55, 56, 63, 64, 300, 70_000):
        prefix, data = rnd.randbytes(size % 97), rnd.randbytes(size)
        inner = hashlib.sha256(data).digest()
        assert FAST.leaf(prefix, data) == hashlib.sha256(prefix + inner).digest()
    with pytest.raises(ValueError, match="n \\* 32"):
        FAST.merkle_root(b"x" * 33)
    with pytest.raises(TypeError):
        FAST.leaf("text", b"")


def test_gcm_sealer_matches_the_generic_cose_encoding_and_rejects_bad_arguments() -> None:
    """Envelope and AAD against the generic (cbor2-based) definitions in envelope.py, across
    every CBOR head size: Partial IVs of 1-5 bytes, ciphertexts and AADs of 1-5 byte heads."""
    assert FAST is not None
    keys = SessionKeys.derive(os.urandom(32), os.urandom(8))
    sid = keys.session_id
    ref = AESGCM(keys.key)
    fast = FAST.GcmSealer(keys.key, keys.common_iv, bytes((0x87, 1, 3, 0x48)) + sid,
                          b"\x83\x40\xa2\x04\x48" + sid + b"\x06")
    cases = [(0, 0, 1), (1, 8, 20), (23, 239, 23), (24, 240, 300), (255, 65519, 70_000),
             (256, 65520, 5), (65535, 70_000, 1), (65536, 3, 2), (1 << 24, 1, 3),
             ((1 << 32) + 5, 17, 4), ((1 << 40) - 1, 256, 40)]
    for seq, size, tlen in cases:
        topic, mid, pt = "t" * tlen, f"gw:{seq}", os.urandom(size)
        piv = _piv(seq)
        aad = message_aad(sid, piv, topic, "gw", mid)
        want = encode_envelope(sid, piv, ref.encrypt(keys.nonce(seq), pt, aad))
        env, leaf = fast.seal(seq, pt, tstr(topic) + tstr("gw"), tstr(mid), b"P")
        assert env == want and leaf == accel._py_leaf(b"P", want), (seq, size, tlen)
        assert fast.seal(seq, pt, tstr(topic) + tstr("gw"), tstr(mid), None) == (want, None)
    with pytest.raises(ValueError, match="32 bytes"):
        FAST.GcmSealer(b"k" * 16, keys.common_iv, b"", b"")
    with pytest.raises(OverflowError, match="2\\*\\*40"):
        fast.seal(1 << 40, b"", b"", b"", None)
    with pytest.raises(OverflowError):
        fast.seal(-1, b"", b"", b"", None)
    with pytest.raises(TypeError):
        fast.seal(1, "text", b"", b"", None)
    with pytest.raises(TypeError):
        fast.seal(1, b"", b"", b"", 5)


def _sealer(rec: RecipientKey, seed: int) -> Sealer:
    rnd = random.Random(seed)
    return Sealer(rec.public(), "gw", max_messages=1 << 20, randbytes=rnd.randbytes)


def test_sealer_envelopes_and_leaves_are_the_same_bytes_on_both_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same session secret (seeded randomness): the C and Python paths produce identical
    envelopes and leaves for 300 messages (one- and two-byte partial IVs, long topics)."""
    rec = RecipientKey.generate()
    fast = _sealer(rec, 1)
    with monkeypatch.context() as m:
        m.setattr(accel, "FASTPATH", None)
        m.setattr(accel, "leaf", accel._py_leaf)
        slow = _sealer(rec, 1)
        slow.seal_leaf(b"", b"", b"", None)  # start the session on the Python path
        assert slow._fast is None
    fast.seal_leaf(b"", b"", b"", None)
    assert fast._fast is not None and fast.header != b""
    opener = Opener(RecipientKeyring([rec]), replay_window=1 << 12)
    opener.add_session(fast.header)
    for i in range(1, 300):
        topic = ("t/" * (i % 150)) + str(i)
        tgw, mid = slow.topic_gw_tstr(topic), tstr(f"gw:{i}")
        prefix = b"\x00\x83" + mid + tstr(topic)
        a = fast.seal_leaf(b"p%d" % i * (i % 7), tgw, mid, prefix)
        with monkeypatch.context() as m:
            m.setattr(accel, "leaf", accel._py_leaf)
            b = slow.seal_leaf(b"p%d" % i * (i % 7), tgw, mid, prefix)
        assert a == b, i
        opened = opener.open(a[0], topic=topic, message_id=f"gw:{i}")
        assert opened.plaintext == b"p%d" % i * (i % 7)


def test_batches_sealed_with_the_fast_root_verify_with_the_python_tree() -> None:
    ident = GatewayIdentity.generate()
    builder = BatchBuilder(ident, "gw")
    for i in range(37):
        builder.add(f"gw:{i}", "t", b"x%d" % i)
    batch = builder.seal()
    assert batch is not None
    assert batch.header.root == MerkleTree(list(batch.leaves)).root == batch.tree.root
    assert verify_batch(batch.signed, VerifierKeyring([ident.public()])) == batch.header
