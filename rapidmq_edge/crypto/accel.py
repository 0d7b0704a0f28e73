"""The optional C accelerator (``_fastpath.c``, built by ``pip install`` when a compiler and
OpenSSL's headers are present), or the pure-Python equivalents.

Both compute the same bytes (tests/test_crypto_fastpath.py); the C path only saves the
per-call overhead of the Python bindings (docs/crypto.md, "Cost"). Set
``RAPIDMQ_EDGE_PURE_PYTHON=1`` to use the Python path even when the extension is built
(benchmarks compare the two this way).
"""

from __future__ import annotations

import hashlib
import os
from types import ModuleType

__all__ = ["FASTPATH", "leaf", "merkle_root"]

_sha256 = hashlib.sha256


def _load() -> ModuleType | None:
    if os.environ.get("RAPIDMQ_EDGE_PURE_PYTHON"):
        return None
    try:
        from . import _fastpath  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler or libssl-dev): the Python path
        return None
    return _fastpath  # type: ignore[no-any-return]


#: the C module, or None when the Python path is in use
FASTPATH: ModuleType | None = _load()


def _py_leaf(prefix: bytes, data: bytes) -> bytes:
    """SHA-256(prefix || SHA-256(data))."""
    return _sha256(prefix + _sha256(data).digest()).digest()


def _py_merkle_root(leaves: bytes) -> bytes:
    from .merkle import MerkleTree

    return MerkleTree([leaves[i:i + 32] for i in range(0, len(leaves), 32)]).root


#: SHA-256(prefix || SHA-256(data)): a message leaf from its prefix and forwarded bytes
leaf = FASTPATH.leaf if FASTPATH is not None else _py_leaf
#: RFC 9162 Merkle tree hash over n concatenated 32-byte leaf hashes
merkle_root = FASTPATH.merkle_root if FASTPATH is not None else _py_merkle_root
