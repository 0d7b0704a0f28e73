"""RFC 9162 (Certificate Transparency 2.0) Merkle tree hash and inclusion proofs, SHA-256.

Domain separation as in RFC 9162 §2.1.1: ``leaf = SHA-256(0x00 || data)``,
``node = SHA-256(0x01 || left || right)``, empty tree = ``SHA-256("")``. Building bottom-up and
promoting a level's odd last node unchanged yields exactly the RFC's MTH (largest-power-of-two
split); the tests check this against the recursive definition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ["HASH_SIZE", "MerkleTree", "leaf_hash", "merkle_root", "node_hash", "verify_inclusion"]

HASH_SIZE = 32
_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


class MerkleTree:
    """A Merkle tree over given *leaf hashes*; keeps every level for O(log n) proofs."""

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        level = list(leaf_hashes)
        self.levels: list[list[bytes]] = [level]
        sha = _sha256
        while len(level) > 1:
            # node_hash inlined: this loop is the per-message part of sealing a batch
            nxt = [
                sha(b"\x01" + level[i] + level[i + 1]).digest()
                for i in range(0, len(level) - 1, 2)
            ]
            if len(level) % 2:
                nxt.append(level[-1])
            self.levels.append(nxt)
            level = nxt

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self.levels[0])

    @property
    def root(self) -> bytes:
        """MTH(D[n]); SHA-256 of the empty string for an empty tree."""
        if not self.levels[0]:
            return _sha256(b"").digest()
        return self.levels[-1][0]

    def proof(self, index: int) -> list[bytes]:
        """RFC 9162 §2.1.3.1 inclusion proof (audit path) for leaf ``index``, leaf side first."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf index {index} outside a tree of {self.size}")
        path = []
        for level in self.levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            index >>= 1
        return path


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over ``leaf_hashes``."""
    return MerkleTree(leaf_hashes).root


def verify_inclusion(
    leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: True if leaf hash ``leaf`` is at ``index`` of the tree ``root``."""
    if not 0 <= index < tree_size:
        return False
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0 or len(p) != HASH_SIZE:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
