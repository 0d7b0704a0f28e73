"""RFC 9162 Merkle tree: root and audit paths match the recursive definition; proofs verify."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from rapidmq_edge.crypto.merkle import MerkleTree, leaf_hash, node_hash, verify_inclusion


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1, literally (over leaf *data*)."""
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(m, D[n]), literally."""
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def test_domain_separation() -> None:
    assert leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    assert (
        node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    )
    assert MerkleTree([]).root == hashlib.sha256(b"").digest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70))
def test_root_and_paths_match_rfc_definition(data: list[bytes]) -> None:
    tree = MerkleTree([leaf_hash(x) for x in data])
    assert tree.root == ref_mth(data)
    for i in range(len(data)):
        proof = tree.proof(i)
        assert proof == ref_path(i, data)
        assert verify_inclusion(leaf_hash(data[i]), i, len(data), proof, tree.root)


def test_wrong_proofs_are_rejected() -> None:
    data = [bytes([i]) for i in range(13)]
    tree = MerkleTree([leaf_hash(x) for x in data])
    proof = tree.proof(5)
    leaf = leaf_hash(data[5])
    assert verify_inclusion(leaf, 5, 13, proof, tree.root)
    assert not verify_inclusion(leaf, 6, 13, proof, tree.root)  # wrong index
    assert not verify_inclusion(leaf, 5, 8, proof, tree.root)  # wrong size (signed count)
    assert not verify_inclusion(leaf, 5, 13, proof[:-1], tree.root)  # truncated proof
    assert not verify_inclusion(leaf, 5, 13, [*proof, proof[0]], tree.root)  # extended
    assert not verify_inclusion(leaf_hash(b"x"), 5, 13, proof, tree.root)  # other leaf
    assert not verify_inclusion(leaf, 13, 13, proof, tree.root)
    flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    assert not verify_inclusion(leaf, 5, 13, flipped, tree.root)
