"""What protected forwarding puts on the wire besides the envelopes: the topics of session
headers and batch headers, and the batch message (``[COSE_Sign1, id runs, leaves or null]``).

The gateway's protection (:mod:`rapidmq_edge.pipeline.protect`) writes these; the cloud
consumer (:mod:`rapidmq_edge.cloud`) reads them. See docs/crypto.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import cbor2

from . import accel, cose
from .batch import SignedBatch
from .envelope import tstr
from .errors import MalformedError

__all__ = [
    "BATCH_SUFFIX",
    "MAX_BATCH_IDS",
    "SESSION_SUFFIX",
    "decode_batch_message",
    "encode_batch_message",
    "fast_leaf",
    "id_runs",
    "runs_to_ids",
]

#: topic suffix (after the upstream prefix) of a signed session header
SESSION_SUFFIX = "_session"
#: topic suffix of a batch message
BATCH_SUFFIX = "_batch"
#: the most queue ids a batch message may list: the largest batch ``[security] batch_size``
#: allows. Checked before the runs are expanded: a few bytes of runs could otherwise ask
#: for billions of ids (memory and time) before the signature is even looked at.
MAX_BATCH_IDS = 1 << 20


def fast_leaf(message_id: str, topic: str, payload: bytes) -> bytes:
    """``crypto.batch.message_leaf`` without the generic CBOR encoder (same bytes; tested)."""
    return accel.leaf(b"\x00\x83" + tstr(message_id) + tstr(topic) + b"\x58\x20", payload)


def id_runs(seqs: Sequence[int]) -> list[int]:
    """Increasing queue ids as flat ``[start, length, start, length, ...]``."""
    if seqs and seqs[-1] - seqs[0] == len(seqs) - 1:
        return [seqs[0], len(seqs)]  # one run (increasing ids): no per-id loop
    out: list[int] = []
    for s in seqs:
        if out and out[-2] + out[-1] == s:
            out[-1] += 1
        else:
            out += [s, 1]
    return out


def runs_to_ids(runs: Sequence[int]) -> list[int]:
    """Inverse of :func:`id_runs`; MalformedError on a bad shape."""
    if len(runs) % 2 or not all(isinstance(v, int) and v >= 0 for v in runs):
        raise MalformedError("batch message: id runs must be pairs of unsigned integers")
    if sum(runs[1::2]) > MAX_BATCH_IDS:
        raise MalformedError(f"batch message: more than {MAX_BATCH_IDS} ids")
    out: list[int] = []
    for i in range(0, len(runs), 2):
        out.extend(range(runs[i], runs[i] + runs[i + 1]))
    return out


def encode_batch_message(batch: SignedBatch, seqs: Sequence[int], leaves: bool) -> bytes:
    """Upstream payload of a batch: ``[COSE_Sign1, id runs, leaves (n*32 B) or null]``."""
    return bytes(
        cbor2.dumps([batch.signed, id_runs(seqs), b"".join(batch.leaves) if leaves else None])
    )


def decode_batch_message(data: bytes) -> tuple[bytes, list[int], bytes | None]:
    """``(signed header, queue ids, leaves or None)``; MalformedError on any deviation."""
    arr = cose.as_array(cose.decode_strict(data, "batch message"), 3, "batch message")
    signed = cose.as_bytes(arr[0], "batch message header")
    if not isinstance(arr[1], list):
        raise MalformedError("batch message: id runs must be an array")
    leaves = arr[2]
    if leaves is not None and (not isinstance(leaves, bytes) or len(leaves) % 32):
        raise MalformedError("batch message: leaves must be n * 32 bytes or null")
    return signed, runs_to_ids(arr[1]), leaves
