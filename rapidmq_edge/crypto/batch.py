"""Signed Merkle batches and the batch chain (sans-I/O).

Each forwarded message becomes an RFC 9162 leaf; every batch's Merkle root goes into a batch
header signed with ML-DSA-65 as COSE_Sign1 (RFC 9052 + RFC 9964, alg -49, empty context). Each
header carries the previous batch's root, chaining the batches (genesis: 32 zero bytes).

Wire formats (CBOR diagnostic notation, details in docs/crypto.md)::

    leaf data     = [message_id: tstr, topic: tstr, sha256(payload as forwarded): bstr]
    batch header  = ["rmq-batch/1", gateway_id, seq, prev_root, count, root,
                     first_message_id, last_message_id, time_ms]
    signed header = 18([<< {1: -49, 4: kid} >>, {}, << batch header >>, signature])
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from . import accel, cose
from .errors import MalformedError, SignatureError, UnknownKeyError
from .keys import KID_SIZE, GatewayIdentity, VerifierKeyring
from .merkle import HASH_SIZE, MerkleTree, leaf_hash

__all__ = [
    "BATCH_HEADER_TYPE",
    "GENESIS_ROOT",
    "BatchBuilder",
    "BatchHeader",
    "BrokenLink",
    "ChainEntry",
    "ChainReport",
    "SignedBatch",
    "message_leaf",
    "sign_batch_header",
    "verify_batch",
    "verify_chain",
]

BATCH_HEADER_TYPE = "rmq-batch/1"
GENESIS_ROOT = bytes(HASH_SIZE)


def message_leaf(message_id: str, topic: str, payload: bytes) -> bytes:
    """Leaf hash of one forwarded message (payload = the bytes as forwarded, e.g. the envelope)."""
    data = cose.dumps([message_id, topic, hashlib.sha256(payload).digest()])
    return leaf_hash(data)


@dataclass(frozen=True)
class BatchHeader:
    """What one signed batch asserts."""

    gateway_id: str
    seq: int
    prev_root: bytes
    count: int
    root: bytes
    first_id: str
    last_id: str
    time_ms: int

    def encode(self) -> bytes:
        """Deterministic CBOR array (the COSE_Sign1 payload)."""
        return cose.dumps(
            [
                BATCH_HEADER_TYPE,
                self.gateway_id,
                self.seq,
                self.prev_root,
                self.count,
                self.root,
                self.first_id,
                self.last_id,
                self.time_ms,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> BatchHeader:
        """Parse a batch header payload; MalformedError on any deviation."""
        arr = cose.as_array(cose.decode_strict(data, "batch header"), 9, "batch header")
        if arr[0] != BATCH_HEADER_TYPE:
            raise MalformedError(
                f"batch header: type {cose.show(arr[0])} is not {BATCH_HEADER_TYPE!r}")
        gw, seq, count, first, last, t = arr[1], arr[2], arr[4], arr[6], arr[7], arr[8]
        if not (isinstance(gw, str) and isinstance(first, str) and isinstance(last, str)):
            raise MalformedError("batch header: gateway id and message ids must be text")
        if not all(isinstance(v, int) and v >= 0 for v in (seq, count, t)):
            raise MalformedError("batch header: seq, count and time must be unsigned integers")
        return cls(
            gateway_id=gw,
            seq=seq,
            prev_root=cose.as_bytes(arr[3], "prev_root", HASH_SIZE),
            count=count,
            root=cose.as_bytes(arr[5], "root", HASH_SIZE),
            first_id=first,
            last_id=last,
            time_ms=t,
        )


def sign_batch_header(header: BatchHeader, identity: GatewayIdentity) -> bytes:
    """COSE_Sign1 (tag 18) over the encoded header, ML-DSA-65, kid = identity kid."""
    return cose.sign1_ml_dsa_65(header.encode(), identity.kid, identity.sign)


def parse_signed_header(data: bytes) -> tuple[BatchHeader, bytes, bytes, bytes, bytes]:
    """Parse without verifying: ``(header, kid, protected, payload, signature)``."""
    kid, protected, payload, signature = cose.parse_sign1_ml_dsa_65(data, "COSE_Sign1",
                                                                    KID_SIZE)
    return BatchHeader.decode(payload), kid, protected, payload, signature


def verify_batch(data: bytes, keyring: VerifierKeyring) -> BatchHeader:
    """Verify a signed batch header; returns the header.

    Raises MalformedError, UnknownKeyError (kid not in keyring) or SignatureError.
    """
    header, kid, protected, payload, signature = parse_signed_header(data)
    if not keyring.verify(kid, cose.sig_structure(protected, payload), signature):
        raise SignatureError(f"batch {header.seq}: ML-DSA-65 signature does not verify")
    return header


@dataclass(frozen=True)
class SignedBatch:
    """A sealed batch: its header, the COSE_Sign1 bytes and the leaf hashes it covers."""

    header: BatchHeader
    signed: bytes
    leaves: tuple[bytes, ...]

    @cached_property
    def tree(self) -> MerkleTree:
        """The Merkle tree over :attr:`leaves` (built on first use: sealing needs only the
        root)."""
        return MerkleTree(self.leaves)

    def proof(self, index: int) -> list[bytes]:
        """Inclusion proof of leaf ``index`` (verify with merkle.verify_inclusion)."""
        return self.tree.proof(index)


class BatchBuilder:
    """Accumulates message leaves and seals them into chained, signed batches."""

    def __init__(
        self,
        identity: GatewayIdentity,
        gateway_id: str,
        *,
        next_seq: int = 0,
        prev_root: bytes = GENESIS_ROOT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self.next_seq = next_seq
        self.prev_root = prev_root
        self._clock = clock
        self._leaves: list[bytes] = []
        self._first: str | None = None
        self._last = ""

    def __len__(self) -> int:
        return len(self._leaves)

    def add_leaf(self, message_id: str, leaf: bytes) -> int:
        """Add a precomputed leaf hash; returns its index in the open batch."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf hash must be 32 bytes")
        if self._first is None:
            self._first = message_id
        self._last = message_id
        self._leaves.append(leaf)
        return len(self._leaves) - 1

    def add_leaves(self, first_id: str, last_id: str, leaves: Sequence[bytes]) -> None:
        """Add many precomputed 32-byte leaf hashes at once (ids of the first and last)."""
        if not leaves:
            return
        if set(map(len, leaves)) != {HASH_SIZE}:
            raise ValueError("leaf hashes must be 32 bytes")
        if self._first is None:
            self._first = first_id
        self._last = last_id
        self._leaves.extend(leaves)

    def add(self, message_id: str, topic: str, payload: bytes) -> int:
        """Add one forwarded message; returns its index in the open batch."""
        return self.add_leaf(message_id, message_leaf(message_id, topic, payload))

    def seal(self) -> SignedBatch | None:
        """Sign the open batch (None if empty) and start the next one, chained to it."""
        if not self._leaves:
            return None
        root = accel.merkle_root(b"".join(self._leaves))
        header = BatchHeader(
            gateway_id=self.gateway_id,
            seq=self.next_seq,
            prev_root=self.prev_root,
            count=len(self._leaves),
            root=root,
            first_id=self._first or "",
            last_id=self._last,
            time_ms=int(self._clock() * 1000),
        )
        batch = SignedBatch(header, sign_batch_header(header, self.identity), tuple(self._leaves))
        self.next_seq += 1
        self.prev_root = root
        self._leaves, self._first, self._last = [], None, ""
        return batch


# ----------------------------------------------------------------------------- chain verification


@dataclass(frozen=True)
class ChainEntry:
    """One stored batch: its position in the log, signed header, and leaf hashes if kept."""

    position: int
    signed: bytes
    leaves: bytes | None = None  # concatenated 32-byte leaf hashes


@dataclass(frozen=True)
class BrokenLink:
    """The first link of a chain that fails, and why.

    ``reason`` is one of: malformed, unknown-key, bad-signature, wrong-gateway, missing-batch,
    reordered, repeated, prev-root-mismatch, leaves-mismatch.
    """

    position: int
    seq: int | None
    reason: str
    detail: str


@dataclass(frozen=True)
class ChainReport:
    """Result of :func:`verify_chain`."""

    batches: int  # batches verified before the first broken link (all, if ok)
    messages: int
    head: BatchHeader | None
    broken: BrokenLink | None

    @property
    def ok(self) -> bool:
        """True if every link verified."""
        return self.broken is None


def _peek_seq(entry: ChainEntry) -> int | None:
    try:
        return parse_signed_header(entry.signed)[0].seq
    except MalformedError:
        return None


def verify_chain(
    entries: Iterable[ChainEntry],
    keyring: VerifierKeyring,
    *,
    gateway_id: str | None = None,
    start_seq: int = 0,
    start_prev_root: bytes = GENESIS_ROOT,
) -> ChainReport:
    """Verify a whole chain in order; report the first broken link with a precise reason.

    Checks per batch: COSE/CBOR shape, known kid, ML-DSA-65 signature, gateway id (the first
    batch's if ``gateway_id`` is None), seq = previous + 1, prev_root = previous root, and (when
    stored) that the leaf hashes rebuild the signed root and count.
    """
    it: Iterator[ChainEntry] = iter(entries)
    expected_seq, prev_root = start_seq, start_prev_root
    seen: set[int] = set()
    count = messages = 0
    head: BatchHeader | None = None

    def broken(entry: ChainEntry, seq: int | None, reason: str, detail: str) -> ChainReport:
        link = BrokenLink(entry.position, seq, reason, detail)
        return ChainReport(count, messages, head, link)

    for entry in it:
        try:
            header = verify_batch(entry.signed, keyring)
        except MalformedError as exc:
            return broken(entry, None, "malformed", str(exc))
        except UnknownKeyError as exc:
            return broken(entry, _peek_seq(entry), "unknown-key", str(exc))
        except SignatureError:
            return broken(
                entry,
                _peek_seq(entry),
                "bad-signature",
                "ML-DSA-65 signature does not verify (header or signature modified)",
            )
        if gateway_id is None:
            gateway_id = header.gateway_id
        elif header.gateway_id != gateway_id:
            return broken(
                entry,
                header.seq,
                "wrong-gateway",
                f"batch signed for gateway {header.gateway_id!r}, chain is {gateway_id!r}",
            )
        if header.seq != expected_seq:
            if header.seq in seen:
                return broken(
                    entry,
                    header.seq,
                    "repeated",
                    f"batch seq {header.seq} appears again (expected {expected_seq})",
                )
            if header.seq < expected_seq:
                return broken(
                    entry,
                    header.seq,
                    "reordered",
                    f"batch seq {header.seq} found where seq {expected_seq} was expected",
                )
            later = any(_peek_seq(e) == expected_seq for e in it)
            if later:
                return broken(
                    entry,
                    header.seq,
                    "reordered",
                    f"batch seq {header.seq} found where seq {expected_seq} was expected; "
                    f"batch {expected_seq} comes later in the log",
                )
            return broken(
                entry,
                header.seq,
                "missing-batch",
                f"batch seq {header.seq} found where seq {expected_seq} was expected: "
                f"batch {expected_seq}"
                + (f"..{header.seq - 1}" if header.seq - 1 > expected_seq else "")
                + " missing (deleted)",
            )
        if header.prev_root != prev_root:
            return broken(
                entry,
                header.seq,
                "prev-root-mismatch",
                f"prev_root {header.prev_root.hex()[:16]}… is not the root of the previous "
                f"batch {prev_root.hex()[:16]}…",
            )
        if entry.leaves is not None:
            leaves = entry.leaves
            if len(leaves) % HASH_SIZE or len(leaves) // HASH_SIZE != header.count:
                return broken(
                    entry,
                    header.seq,
                    "leaves-mismatch",
                    f"{len(leaves) / HASH_SIZE:g} stored leaves, header says {header.count}",
                )
            hashes = [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
            if MerkleTree(hashes).root != header.root:
                return broken(
                    entry,
                    header.seq,
                    "leaves-mismatch",
                    "stored leaves do not hash to the signed root (a message record was modified)",
                )
        seen.add(header.seq)
        expected_seq, prev_root = header.seq + 1, header.root
        count += 1
        messages += header.count
        head = header
    return ChainReport(count, messages, head, None)


def split_leaves(leaves: bytes) -> Sequence[bytes]:
    """Concatenated leaf hashes -> list of 32-byte hashes."""
    return [leaves[i : i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
