"""Resumable chunked downloads: a plan (size, chunk size, per-chunk SHA-256), a pure check of
each chunk against it, and :class:`PartialDownload`, the file adapter that survives kill -9.

On disk, in the partial directory, for a payload with digest ``D`` (hex):

* ``D.part``: the preallocated payload file; chunk ``i`` lives at ``i * chunk_size``.
* ``D.bits``: the sidecar: a 32-byte fingerprint of the plan, an 8-byte count of the bytes
  received over all runs (wasted ones included), then one bit per verified chunk.

A chunk is written to ``D.part`` and fsynced *before* its bit is set in ``D.bits`` (one byte
written in place, then fsynced), so a crash at any point never marks an unwritten chunk; at
worst a written chunk is fetched again. ``finish()`` checks size and whole digest, then
renames the file into place (same filesystem, atomic) and fsyncs the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..telemetry import RepeatedLog

__all__ = [
    "ChunkPlan", "ChunkPlanLike", "ChunkRefused", "DownloadError", "PartialDownload",
    "Progress", "check_chunk", "check_plan", "chunk_length", "discard_superseded",
    "plan_chunks",
]

log = logging.getLogger(__name__)

#: largest chunk accepted in a plan (a chunk is held in memory while it is checked)
MAX_CHUNK_SIZE = 16 << 20
_COUNTER = struct.Struct("!Q")
_HEADER = 32 + _COUNTER.size


class ChunkPlanLike(Protocol):
    """What a download needs from a (signed) manifest."""

    @property
    def payload_digest(self) -> bytes: ...
    @property
    def payload_size(self) -> int: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def chunk_digests(self) -> tuple[bytes, ...]: ...


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """A payload's SHA-256, its size, and the SHA-256 of each ``chunk_size`` slice."""

    payload_digest: bytes
    payload_size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]


class DownloadError(Exception):
    """A plan, a chunk or a finished payload does not match what was signed."""


class ChunkRefused(DownloadError):
    """One chunk failed its check (the reason is the message)."""


def plan_chunks(payload: bytes, chunk_size: int) -> ChunkPlan:
    """The plan of ``payload`` cut into ``chunk_size`` slices (the operator side)."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK_SIZE}")
    digests = tuple(hashlib.sha256(payload[o:o + chunk_size]).digest()
                    for o in range(0, len(payload), chunk_size))
    return ChunkPlan(hashlib.sha256(payload).digest(), len(payload), chunk_size, digests)


def check_plan(plan: ChunkPlanLike) -> None:
    """Raise :class:`DownloadError` naming what is inconsistent in ``plan``."""
    if len(plan.payload_digest) != 32:
        raise DownloadError("payload digest is not 32 bytes (SHA-256)")
    if plan.payload_size <= 0:
        raise DownloadError(f"payload size {plan.payload_size} is not positive")
    if not 1 <= plan.chunk_size <= MAX_CHUNK_SIZE:
        raise DownloadError(f"chunk size {plan.chunk_size} outside 1..{MAX_CHUNK_SIZE}")
    need = -(-plan.payload_size // plan.chunk_size)
    if len(plan.chunk_digests) != need:
        raise DownloadError(f"{len(plan.chunk_digests)} chunk digests for {need} chunks")
    if any(len(d) != 32 for d in plan.chunk_digests):
        raise DownloadError("a chunk digest is not 32 bytes (SHA-256)")


def chunk_length(plan: ChunkPlanLike, index: int) -> int:
    """Bytes in chunk ``index`` (the last one may be short)."""
    if not 0 <= index < len(plan.chunk_digests):
        raise ChunkRefused(f"chunk index {index} outside 0..{len(plan.chunk_digests) - 1}")
    return min(plan.chunk_size, plan.payload_size - index * plan.chunk_size)


def check_chunk(plan: ChunkPlanLike, index: int, data: bytes) -> None:
    """Raise :class:`ChunkRefused` unless ``data`` is chunk ``index`` of ``plan``."""
    want = chunk_length(plan, index)
    if len(data) != want:
        raise ChunkRefused(f"chunk {index}: {len(data)} bytes, the plan says {want}")
    if hashlib.sha256(data).digest() != plan.chunk_digests[index]:
        raise ChunkRefused(f"chunk {index}: SHA-256 does not match the plan")


def plan_fingerprint(plan: ChunkPlanLike) -> bytes:
    """SHA-256 over everything in the plan: a sidecar of another plan is never reused."""
    h = hashlib.sha256(b"rapidmq-ota-plan\0")
    h.update(plan.payload_digest + struct.pack("!QQ", plan.payload_size, plan.chunk_size))
    for d in plan.chunk_digests:
        h.update(d)
    return h.digest()


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a download stands; ``received`` counts every byte taken in (all runs),
    ``wasted`` those that were refused or already held (this run)."""

    done_bytes: int
    size: int
    chunks_done: int
    chunks_total: int
    received: int
    wasted: int
    refused: int

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.size if self.size else 1.0


class PartialDownload:
    """The partial file of one plan under ``directory`` (see the module docstring).

    Opening resumes from the sidecar when it belongs to the same plan; otherwise (none,
    another plan, wrong length) the download starts over.
    """

    def __init__(self, directory: Path | str, plan: ChunkPlanLike) -> None:
        check_plan(plan)
        self.plan = plan
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.digest_hex = plan.payload_digest.hex()
        self.part_path = self.dir / f"{self.digest_hex}.part"
        self.bits_path = self.dir / f"{self.digest_hex}.bits"
        self.total = len(plan.chunk_digests)
        self.wasted = 0
        self.refused = 0
        self.last_refusal: str | None = None
        self._repeats = RepeatedLog(log)
        self._fingerprint = plan_fingerprint(plan)
        self._bits = bytearray((self.total + 7) // 8)
        self.received = 0
        self._part = -1
        self._side = -1
        self._open()

    # ------------------------------------------------------------------ files

    def _open(self) -> None:
        side_len = _HEADER + len(self._bits)
        resumed = False
        with contextlib.suppress(FileNotFoundError):
            raw = self.bits_path.read_bytes()
            if (len(raw) == side_len and raw[:32] == self._fingerprint
                    and self.part_path.exists()
                    and self.part_path.stat().st_size == self.plan.payload_size):
                self.received = _COUNTER.unpack_from(raw, 32)[0]
                self._bits[:] = raw[_HEADER:]
                resumed = True
        if not resumed:
            self._bits[:] = bytes(len(self._bits))
            with contextlib.suppress(FileNotFoundError):
                self.bits_path.unlink()
        self._part = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o600)
        if not resumed:
            os.ftruncate(self._part, 0)
            if hasattr(os, "posix_fallocate"):
                try:
                    os.posix_fallocate(self._part, 0, self.plan.payload_size)
                except OSError:  # a filesystem without fallocate: a sparse file will do
                    os.ftruncate(self._part, self.plan.payload_size)
            else:  # pragma: no cover - macOS
                os.ftruncate(self._part, self.plan.payload_size)
            os.fsync(self._part)
            tmp = self.bits_path.with_suffix(".bits.tmp")
            with open(tmp, "wb") as fh:
                fh.write(self._fingerprint + _COUNTER.pack(0) + bytes(self._bits))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.bits_path)
            _fsync_dir(self.dir)
        self._side = os.open(self.bits_path, os.O_RDWR)

    def close(self) -> None:
        """Close the files (the partial stays on disk for a later resume)."""
        for fd in (self._part, self._side):
            if fd >= 0:
                os.close(fd)
        self._part = self._side = -1

    def __enter__(self) -> PartialDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ chunks

    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def missing(self) -> list[int]:
        """Indexes of the chunks not verified yet, in order."""
        return [i for i in range(self.total) if not self.has(i)]

    def complete(self) -> bool:
        return all(self.has(i) for i in range(self.total))

    def put(self, index: int, data: bytes) -> bool:
        """Store chunk ``index`` if it checks out; False (counted, logged) when refused.

        A chunk already held is counted as wasted and not written again.
        """
        self.received += len(data)
        try:
            check_chunk(self.plan, index, data)
        except ChunkRefused as exc:
            self.refused += 1
            self.wasted += len(data)
            self.last_refusal = str(exc)
            self._repeats(f"refused {index}", logging.WARNING,
                          "ota download %s: %s", self.digest_hex[:12], exc)
            self._save_counter()
            return False
        if self.has(index):
            self.wasted += len(data)
            self._save_counter()
            return True
        os.pwrite(self._part, data, index * self.plan.chunk_size)
        os.fsync(self._part)  # the chunk is on disk before its bit can be
        self._bits[index >> 3] |= 1 << (index & 7)
        os.pwrite(self._side, _COUNTER.pack(self.received), 32)
        os.pwrite(self._side, bytes((self._bits[index >> 3],)), _HEADER + (index >> 3))
        os.fsync(self._side)
        return True

    def _save_counter(self) -> None:
        os.pwrite(self._side, _COUNTER.pack(self.received), 32)

    @property
    def progress(self) -> Progress:
        done = sum(chunk_length(self.plan, i) for i in range(self.total) if self.has(i))
        return Progress(done, self.plan.payload_size, sum(map(self.has, range(self.total))),
                        self.total, self.received, self.wasted, self.refused)

    # ------------------------------------------------------------------ the end

    def finish(self, dest: Path | str | None = None) -> Path:
        """Check the whole payload and rename it to ``dest`` (default: ``<dir>/<digest>``).

        On a size or digest mismatch the chunks that no longer check out are marked
        missing again and :class:`DownloadError` is raised (fetch them, then finish again).
        """
        if not self.complete():
            raise DownloadError(f"{len(self.missing())} of {self.total} chunks still missing")
        if os.fstat(self._part).st_size != self.plan.payload_size:
            raise DownloadError("partial file has the wrong size")
        h = hashlib.sha256()
        bad: list[int] = []
        for i in range(self.total):
            data = os.pread(self._part, chunk_length(self.plan, i), i * self.plan.chunk_size)
            h.update(data)
            if hashlib.sha256(data).digest() != self.plan.chunk_digests[i]:
                bad.append(i)
        if bad or h.digest() != self.plan.payload_digest:
            for i in bad:
                self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                os.pwrite(self._side, bytes((self._bits[i >> 3],)), _HEADER + (i >> 3))
            os.fsync(self._side)
            raise DownloadError(
                f"payload SHA-256 mismatch: {len(bad)} chunk(s) changed on disk, fetching again"
                if bad else "payload SHA-256 does not match the plan (chunk digests do)")
        target = Path(dest) if dest is not None else self.dir / self.digest_hex
        self.close()
        os.replace(self.part_path, target)
        _fsync_dir(target.parent)
        with contextlib.suppress(FileNotFoundError):
            self.bits_path.unlink()
        return target

    def discard(self) -> None:
        """Delete the partial and its sidecar."""
        self.close()
        for p in (self.part_path, self.bits_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def discard_superseded(directory: Path | str, keep: Iterable[bytes]) -> list[Path]:
    """Delete every partial (``.part``, ``.bits``) under ``directory`` whose payload digest
    is not in ``keep`` (the plans still wanted); return what was deleted."""
    wanted = {d.hex() for d in keep}
    gone: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return gone
    for p in sorted(d.iterdir()):
        if p.suffix not in (".part", ".bits", ".tmp") or p.name.split(".")[0] in wanted:
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            gone.append(p)
    return gone


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
