"""Signed Merkle batches and verify_chain: every modification is named precisely."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rapidmq_edge.crypto.batch import (
    GENESIS_ROOT,
    BatchBuilder,
    BatchHeader,
    ChainEntry,
    message_leaf,
    sign_batch_header,
    verify_batch,
    verify_chain,
)
from rapidmq_edge.crypto.errors import CryptoError, MalformedError, SignatureError, UnknownKeyError
from rapidmq_edge.crypto.keys import GatewayIdentity, VerifierKeyring
from rapidmq_edge.crypto.merkle import verify_inclusion

GW = "gw-1"
IDENT = GatewayIdentity(bytes(range(32)))
RING = VerifierKeyring([IDENT.public()])


def make_chain(
    n_batches: int = 5, per: int = 4, ident: GatewayIdentity = IDENT
) -> list[ChainEntry]:
    b = BatchBuilder(ident, GW, clock=lambda: 1_700_000_000.0)
    out = []
    for k in range(n_batches):
        for j in range(per):
            i = k * per + j
            b.add(f"{GW}:{i}", "t", b"payload %d" % i)
        sb = b.seal()
        assert sb is not None
        out.append(ChainEntry(k, sb.signed, b"".join(sb.leaves)))
    return out


def test_batch_round_trip_and_proofs() -> None:
    b = BatchBuilder(IDENT, GW)
    assert b.seal() is None
    msgs = [(f"{GW}:{i}", f"t/{i % 3}", b"m%d" % i) for i in range(37)]
    for m in msgs:
        b.add(*m)
    sb = b.seal()
    assert sb is not None
    h = verify_batch(sb.signed, RING)
    assert (h.seq, h.count, h.prev_root, h.first_id, h.last_id) == (
        0,
        37,
        GENESIS_ROOT,
        f"{GW}:0",
        f"{GW}:36",
    )
    for i, m in enumerate(msgs):
        assert verify_inclusion(message_leaf(*m), i, h.count, sb.proof(i), h.root)
    assert not verify_inclusion(
        message_leaf(msgs[0][0], msgs[0][1], b"other"), 0, 37, sb.proof(0), h.root
    )
    # next batch chains to this root
    b.add("x", "t", b"y")
    nxt = b.seal()
    assert nxt is not None and nxt.header.prev_root == h.root and nxt.header.seq == 1
    assert len(sb.signed) < 3309 + 250


def test_every_bit_flip_of_a_signed_batch_header_is_detected() -> None:
    b = BatchBuilder(IDENT, GW)
    b.add(f"{GW}:1", "t", b"x")
    sb = b.seal()
    assert sb is not None
    data = sb.signed
    sig_start = len(data) - 3309
    assert data[sig_start:] == sb.signed[-3309:]
    # every bit of the framing, protected header and batch header payload; in the 3,309-byte
    # signature one bit per byte, rotating (a full sweep takes 6 s and adds nothing)
    for i in range(len(data)):
        for bit in range(8) if i < sig_start else [i % 8]:
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(CryptoError):
                verify_batch(bytes(bad), RING)
    for cut in range(0, len(data), 5):
        with pytest.raises(MalformedError):
            verify_batch(data[:cut], RING)


def test_wrong_key_is_reported() -> None:
    other = GatewayIdentity(bytes(range(1, 33)))
    b = BatchBuilder(other, GW)
    b.add("1", "t", b"x")
    sb = b.seal()
    assert sb is not None
    with pytest.raises(UnknownKeyError):
        verify_batch(sb.signed, RING)
    # the same kid claimed by a different key: signature fails
    forged_ring = VerifierKeyring()
    forged_ring._keys[other.kid] = IDENT.public()  # simulate a kid collision / substituted key
    with pytest.raises(SignatureError):
        verify_batch(sb.signed, forged_ring)
    report = verify_chain([ChainEntry(0, sb.signed)], RING)
    assert report.broken is not None and report.broken.reason == "unknown-key"


def test_intact_chain_verifies() -> None:
    report = verify_chain(make_chain(), RING)
    assert report.ok and report.batches == 5 and report.messages == 20
    assert report.head is not None and report.head.seq == 4


def test_modified_batch_is_named() -> None:
    chain = make_chain()
    bad = bytearray(chain[2].signed)
    bad[-5] ^= 0x40  # inside the signature
    chain[2] = replace(chain[2], signed=bytes(bad))
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.position, r.broken.seq, r.broken.reason) == (
        2,
        2,
        "bad-signature",
    )
    assert r.batches == 2


def test_modified_leaf_is_named() -> None:
    chain = make_chain()
    leaves = bytearray(chain[3].leaves or b"")
    leaves[40] ^= 1
    chain[3] = replace(chain[3], leaves=bytes(leaves))
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (3, "leaves-mismatch")
    chain = make_chain()
    chain[1] = replace(chain[1], leaves=(chain[1].leaves or b"")[:-32])
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (1, "leaves-mismatch")
    assert "3 stored leaves, header says 4" in r.broken.detail


def test_deleted_batch_is_named() -> None:
    chain = make_chain()
    del chain[2]
    r = verify_chain(chain, RING)
    assert r.broken is not None
    assert (r.broken.position, r.broken.seq, r.broken.reason) == (3, 3, "missing-batch")
    assert "batch 2 missing" in r.broken.detail


def test_reordered_and_repeated_batches_are_named() -> None:
    chain = make_chain()
    chain[1], chain[3] = chain[3], chain[1]
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (3, "reordered")
    assert "batch 1 comes later" in r.broken.detail
    chain = make_chain()
    chain.insert(3, chain[1])
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.seq, r.broken.reason) == (1, "repeated")


def test_resigned_fork_is_caught_by_prev_root() -> None:
    # the key holder re-signs batch 2 with other content: batch 3 no longer links
    chain = make_chain()
    h2 = verify_batch(chain[2].signed, RING)
    forged = replace(h2, root=b"\x11" * 32)
    chain[2] = ChainEntry(2, sign_batch_header(forged, IDENT), None)
    r = verify_chain(chain, RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (
        3,
        "prev-root-mismatch",
    )


def test_gateway_mismatch_and_rotation() -> None:
    chain = make_chain(2)
    other_gw = BatchBuilder(
        IDENT, "gw-2", next_seq=2, prev_root=verify_batch(chain[1].signed, RING).root
    )
    other_gw.add("1", "t", b"x")
    sb = other_gw.seal()
    assert sb is not None
    r = verify_chain([*chain, ChainEntry(2, sb.signed)], RING)
    assert r.broken is not None and r.broken.reason == "wrong-gateway"
    # identity rotation mid-chain: a keyring with both keys verifies the whole chain
    new = GatewayIdentity(bytes(range(3, 35)))
    rotated = BatchBuilder(new, GW, next_seq=2, prev_root=verify_batch(chain[1].signed, RING).root)
    rotated.add("1", "t", b"x")
    sb2 = rotated.seal()
    assert sb2 is not None
    full = [*chain, ChainEntry(2, sb2.signed)]
    assert verify_chain(full, VerifierKeyring([IDENT.public(), new.public()])).ok
    r = verify_chain(full, RING)
    assert r.broken is not None and (r.broken.position, r.broken.reason) == (2, "unknown-key")


def test_header_decode_rejects_bad_shapes() -> None:
    h = BatchHeader(GW, 0, GENESIS_ROOT, 1, b"\x00" * 32, "a", "b", 1)
    assert BatchHeader.decode(h.encode()) == h
    with pytest.raises(MalformedError):
        BatchHeader.decode(replace(h, root=b"\x00" * 31).encode())
    with pytest.raises(MalformedError):
        BatchHeader.decode(h.encode() + b"\x00")
