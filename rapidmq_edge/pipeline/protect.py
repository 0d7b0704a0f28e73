"""Post-quantum protection on the forwarding path: envelopes at enqueue, signed batch chain.

The forwarder hands messages of ``encrypt``/``sign`` rules to :class:`Protector.put` instead of
the queue. Decisions (docs/crypto.md, "Gateway integration"):

* **Sealing at enqueue time.** The envelope (bound to topic, gateway id and the message id
  ``gateway:queue-id``, known before ``put`` via ``ForwardQueue.next_id``) is what the queue
  stores, so the bytes hashed into the batch leaf are exactly the bytes forwarded, on every
  retry and after a restart. A session header is queued (class 0, ``{prefix}_session``) before
  the first envelope of each session.
* **Chain records in the queue's own transaction.** The chain tables (``batches`` as in
  :mod:`~rapidmq_edge.crypto.batchlog`, so ``audit verify`` reads it, ``chain_pending``, ``meta``)
  live in ``forward.db``; ``ForwardQueue.write_hook`` writes a message's leaf, or a sealed batch, in
  the same SQLite transaction as the queue row it belongs to. After ``kill -9`` a message row
  exists iff its leaf (pending or in a batch) exists, and a batch exists iff its upstream
  header message is queued: the device is acked only after that commit, so every acked
  message is forwarded and is either in a signed batch or pending.
* **Batches** are sealed on the event loop when ``batch_size`` leaves are open or the oldest is
  ``batch_max_age`` old; the published header (``{prefix}_batch``, class 0, never
  ``drop_oldest``) is a queue row, forwarded only once committed. Its payload is
  ``[COSE_Sign1, id runs, leaves or null]`` (:func:`encode_batch_message`).
* **Signed sessions, leaves only where needed** (``manifest = "auto"``): session headers are
  signed by the gateway identity (:mod:`~rapidmq_edge.crypto.signed_session`), so every
  encrypted message verifies on its own by its AEAD; a batch carries its leaves (32 B per
  message) only when it holds a signed-but-not-encrypted message, which needs them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config.forwarding import ForwardRule, UpstreamSettings
from ..config.security import SecuritySettings
from ..crypto import accel
from ..crypto.batch import GENESIS_ROOT, BatchBuilder, SignedBatch, parse_signed_header
from ..crypto.batch_message import BATCH_SUFFIX, SESSION_SUFFIX, encode_batch_message
from ..crypto.batchlog import _SCHEMA as CHAIN_SCHEMA
from ..crypto.envelope import MAX_SEQ, Sealer, tstr
from ..crypto.errors import BatchError, KeyFileError
from ..crypto.keys import GatewayIdentity, RecipientPublicKey
from ..crypto.keystore import KeyStore
from ..crypto.signed_session import sign_session
from ..mqtt.id_frame import FRAME_PROPS
from ..store.errors import QueueFull
from ..store.forward_queue import ForwardQueue

__all__ = ["Protector", "make_protector"]

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "RAPIDMQ_KEY_PASSPHRASE"


#: leaves not yet in a signed batch: one row per commit group (ids as int64 array, n*32 B)
_PENDING_SCHEMA = """
CREATE TABLE IF NOT EXISTS chain_pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT, qids BLOB NOT NULL, leaves BLOB NOT NULL);
"""


class Protector:
    """Seals and logs the messages of protected rules; see the module docstring."""

    def __init__(
        self,
        gateway_id: str,
        settings: SecuritySettings,
        rules: Sequence[ForwardRule],
        upstreams: Sequence[UpstreamSettings],
        queue: ForwardQueue,
        keys_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.gateway_id = gateway_id
        self.settings = settings
        self.queue = queue
        self.clock = clock
        self.store = KeyStore(keys_dir)
        self.passphrase = self._passphrase()
        self.prefix = {
            u.name: u.topic_prefix.replace("{gateway_id}", gateway_id) for u in upstreams
        }
        encrypting = sorted({r.upstream for r in rules if r.encrypt})
        signing = sorted({r.upstream for r in rules if r.sign})
        self.chain_upstream = signing[0] if signing else None
        self.recipient: RecipientPublicKey | None = (
            self.store.recipient_public() if encrypting else None
        )
        self.sealers = {
            up: Sealer(
                self.recipient,  # type: ignore[arg-type]
                gateway_id,
                # +1: the first sequence number of each session is skipped (see put)
                max_messages=min(settings.session_max_messages + 1, MAX_SEQ + 1),
                max_age=settings.session_max_age,
                clock=clock,
            )
            for up in encrypting
        }
        self._queued_header: dict[str, bytes] = {}
        #: MQTT 3.1.1 upstreams: no rmq-id property; the uplink frames the id into the payload
        self._framed = {u.name for u in upstreams if u.protocol != 5}
        self._gw_colon = gateway_id + ":"
        self._gw_t = tstr(gateway_id)
        #: CBOR text head + "gateway:" for message ids with d decimal digits (index d)
        self._mid_pre = [
            tstr(self._gw_colon + "0" * d)[: -d or None] for d in range(21)
        ]
        #: topic -> (CBOR topic || CBOR gateway id: AAD part, CBOR topic || 0x5820: leaf part)
        self._topics: dict[str, tuple[bytes, bytes]] = {}
        #: id(rule) -> (rule, upstream, sealer or None, sign, priority): per-rule constants
        self._plans: dict[int, tuple[ForwardRule, str, Sealer | None, bool, int]] = {}
        #: queue id -> its leaf (bytes) or sealed batch, until the write hook stores it
        self._staged: dict[int, bytes | SignedBatch] = {}
        self._open: list[bytes] = []  # leaves of the open batch
        self._open_ids = array("q")  # their queue ids
        self._open_plain = False  # a signed-only (not encrypted) message in the open batch
        self._batch_size = settings.batch_size
        self._open_since: float | None = None
        self._keys_mtime = self._index_mtime()
        self.sealed_batches = 0
        self.batch_failures = 0
        self._task: asyncio.Task[None] | None = None
        self.builder: BatchBuilder | None = None
        if self.chain_upstream is not None:
            self.builder = self._load_chain(self.store.identity(self.passphrase))
            queue.write_hook = self._write_hook

    # -- setup -------------------------------------------------------------------------

    def _passphrase(self) -> bytes | None:
        if self.settings.passphrase_file is not None:
            try:
                text = self.settings.passphrase_file.read_text().splitlines()
            except OSError as exc:
                raise KeyFileError(f"security.passphrase_file: {exc}") from None
            return text[0].encode() if text else b""
        env = os.environ.get(PASSPHRASE_ENV)
        return env.encode() if env else None

    def _index_mtime(self) -> float:
        try:
            return (self.store.directory / "keyring.json").stat().st_mtime
        except OSError:
            return 0.0

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.queue.path), isolation_level=None, timeout=10)
        db.executescript(CHAIN_SCHEMA + _PENDING_SCHEMA)
        return db

    def _load_chain(self, identity: GatewayIdentity) -> BatchBuilder:
        """Head of the stored chain and the pending leaves (after a restart or kill -9)."""
        db = self._connect()
        try:
            row = db.execute("SELECT v FROM meta WHERE k='gateway_id'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('gateway_id', ?)", (self.gateway_id,))
            elif row[0] != self.gateway_id:
                raise BatchError(
                    f"{self.queue.path} holds the chain of gateway {row[0]!r}, "
                    f"not {self.gateway_id!r}"
                )
            next_seq, prev_root = 0, GENESIS_ROOT
            last = db.execute("SELECT signed FROM batches ORDER BY pos DESC LIMIT 1").fetchone()
            if last is not None:
                head = parse_signed_header(bytes(last[0]))[0]
                next_seq, prev_root = head.seq + 1, head.root
            pending = db.execute("SELECT qids, leaves FROM chain_pending ORDER BY id").fetchall()
        finally:
            db.close()
        builder = BatchBuilder(
            identity, self.gateway_id, next_seq=next_seq, prev_root=prev_root, clock=self.clock
        )
        self._open, self._open_ids = [], array("q")
        for qid_blob, leaf_blob in pending:
            self._open_ids.frombytes(bytes(qid_blob))
            blob = bytes(leaf_blob)
            self._open += [blob[i:i + 32] for i in range(0, len(blob), 32)]
        if self._open:
            self._open_since = self.clock()
            self._open_plain = True  # not known what they were: publish their leaves
            log.info("batch chain: %d pending leaves carried over", len(self._open))
        return builder

    # -- the forwarding tap ------------------------------------------------------------

    def put(
        self, rule: ForwardRule, topic: str, payload: bytes, qos: int, props: bytes,
        ttl: float | None, origin: str | None = None,
    ) -> int:
        """Queue one message of a protected rule (sealed if ``encrypt``, logged if ``sign``).

        Raises like ``ForwardQueue.put`` (QueueFull...): then nothing was queued or logged
        (an envelope sealed for a refused put only consumes a sequence number).
        """
        plan = self._plans.get(id(rule))
        if plan is None or plan[0] is not rule:
            plan = self._plan(rule)
        _, up, sealer, sign, priority = plan
        queue = self.queue
        mid = queue.next_id
        digits = b"%d" % mid
        mid_t = self._mid_pre[len(digits)] + digits  # == tstr(f"{gateway}:{mid}")
        tc = self._topics.get(topic) or self._topic_parts(topic)
        # leaf = crypto.batch.message_leaf, fused: SHA-256(0x00 || [mid, topic, SHA-256(payload)])
        prefix = b"".join((b"\x00\x83", mid_t, tc[1])) if sign else None
        if sealer is not None:
            # seals, renews the session when due, and hashes the envelope into its leaf
            payload_out, leaf = sealer.seal_leaf(payload, tc[0], mid_t, prefix)
            if sealer.header is not self._queued_header.get(up):
                # a new session: its header goes first (taking this id), then seal again
                # under the next id (the first sequence number is simply skipped)
                self._queued_header[up] = sealer.header
                header = sealer.header
                if self.builder is not None:  # encrypt implies sign (validated)
                    header = sign_session(header, self.builder.identity)
                queue.put(up, 0, self.prefix[up] + SESSION_SUFFIX, header, 1)
                mid = queue.next_id
                mid_t = tstr(self._gw_colon + str(mid))
                prefix = b"".join((b"\x00\x83", mid_t, tc[1])) if sign else None
                payload_out, leaf = sealer.seal_leaf(payload, tc[0], mid_t, prefix)
            payload = payload_out
        elif prefix is not None:
            self._open_plain = True
            leaf = accel.leaf(prefix, payload)
        if up in self._framed:
            props = FRAME_PROPS  # tells the uplink to frame the id (3.1.1 sends no properties)
        got = queue.put(up, priority, topic, payload, qos, props, ttl, origin)
        if got != mid:  # pragma: no cover - the queue assigns ids in order
            raise RuntimeError(f"queue id {got} != expected {mid}")
        if sign:
            assert leaf is not None  # sign: a prefix was given
            self._staged[mid] = leaf
            opened = self._open
            opened.append(leaf)
            self._open_ids.append(mid)
            if self._open_since is None:
                self._open_since = self.clock()
            if len(opened) >= self._batch_size:
                self.seal()
        return mid

    def _plan(self, rule: ForwardRule) -> tuple[ForwardRule, str, Sealer | None, bool, int]:
        if len(self._plans) >= 1024:
            self._plans.clear()
        sealer = self.sealers[rule.upstream] if rule.encrypt else None
        plan = (rule, rule.upstream, sealer, rule.sign, rule.priority)
        self._plans[id(rule)] = plan
        return plan

    def _topic_parts(self, topic: str) -> tuple[bytes, bytes]:
        if len(self._topics) >= 4096:
            self._topics.clear()
        t = tstr(topic)
        parts = self._topics[topic] = (t + self._gw_t, t + b"\x58\x20")
        return parts

    # -- batches -----------------------------------------------------------------------

    def seal(self) -> SignedBatch | None:
        """Sign the open batch and queue its header (None if empty or refused: retried)."""
        builder, up = self.builder, self.chain_upstream
        if builder is None or up is None or not self._open:
            return None
        opened, ids = self._open, self._open_ids
        gw = self._gw_colon
        builder.add_leaves(f"{gw}{ids[0]}", f"{gw}{ids[-1]}", opened)
        prev = (builder.next_seq, builder.prev_root)
        batch = builder.seal()
        assert batch is not None
        manifest = self.settings.manifest
        payload = encode_batch_message(
            batch, ids, manifest == "leaves" or (manifest == "auto" and self._open_plain))
        bid = self.queue.next_id
        self._staged[bid] = batch
        try:
            self.queue.put(up, 0, self.prefix[up] + BATCH_SUFFIX, payload, 1)
        except QueueFull as exc:
            del self._staged[bid]
            builder.next_seq, builder.prev_root = prev
            self.batch_failures += 1
            log.warning("batch %d not queued (%s); it is retried", batch.header.seq, exc)
            return None
        self._open, self._open_ids, self._open_since = [], array("q"), None
        self._open_plain = False
        self.sealed_batches += 1
        fut = self.queue.commit_future()
        if fut is not None:
            fut.add_done_callback(lambda f: self._batch_committed(f, bid))
        return batch

    def _batch_committed(self, fut: asyncio.Future[None], bid: int) -> None:
        if fut.cancelled() or fut.exception() is None:
            return
        # the batch row and its header message were rolled back together: rebuild the head
        # and the open batch from what is stored (leaves of failed rows are gone with them)
        log.error("batch record (queue id %d) not stored: %s; resyncing the chain",
                  bid, fut.exception())
        assert self.builder is not None
        later = [(q, leaf) for q, leaf in zip(self._open_ids, self._open, strict=True) if q > bid]
        self.builder = self._load_chain(self.builder.identity)
        merged = dict(zip(self._open_ids, self._open, strict=True))
        merged.update(later)
        ordered = sorted(merged.items())
        self._open_ids = array("q", [q for q, _ in ordered])
        self._open = [leaf for _, leaf in ordered]

    def _write_hook(self, db: sqlite3.Connection, rows: list[Any]) -> None:
        """Writer thread, inside the queue's transaction: chain records of these rows.

        Pending leaves are stored as one ``chain_pending`` row per commit group (queue ids
        and leaves packed), not one row per message.
        """
        pop = self._staged.pop
        qids = array("q")
        leaves: list[bytes] = []
        for r in rows:
            item = pop(r[0], None)
            if item is None:
                continue
            if type(item) is bytes:
                qids.append(r[0])
                leaves.append(item)
                continue
            assert isinstance(item, SignedBatch)
            batch = item
            pos = db.execute("SELECT coalesce(max(pos) + 1, 0) FROM batches").fetchone()[0]
            db.execute(
                "INSERT INTO batches (pos, seq, signed, leaves) VALUES (?, ?, ?, ?)",
                (pos, batch.header.seq, batch.signed, b"".join(batch.leaves)),
            )
            # rows come in id order and a batch row has a higher id than its messages, so
            # every pending leaf stored so far (and collected above) is covered by it
            db.execute("DELETE FROM chain_pending")
            qids, leaves = array("q"), []
        if leaves:
            db.execute("INSERT INTO chain_pending (qids, leaves) VALUES (?, ?)",
                       (qids.tobytes(), b"".join(leaves)))

    # -- timers, keys --------------------------------------------------------------------

    def start(self) -> None:
        """Start the batch-age / key-change timer (inside the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        interval = min(0.25, self.settings.batch_max_age / 4)
        last_keys = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                since = self._open_since
                if since is not None and self.clock() - since >= self.settings.batch_max_age:
                    self.seal()
                if time.monotonic() - last_keys >= 1.0:
                    last_keys = time.monotonic()
                    self.reload_keys()
            except Exception:  # pragma: no cover - keep the timer alive
                log.exception("protect timer")

    def reload_keys(self) -> bool:
        """Pick up ``keys rotate`` / ``keys import-recipient`` done while running."""
        mtime = self._index_mtime()
        if mtime == self._keys_mtime:
            return False
        self._keys_mtime = mtime
        if self.sealers:
            rec = self.store.recipient_public()
            if self.recipient is None or rec.kid != self.recipient.kid:
                log.info("sealing to recipient key %s from now on", rec.kid.hex())
                self.recipient = rec
                for s in self.sealers.values():
                    s.set_recipient(rec)
        if self.builder is not None:
            ident = self.store.identity(self.passphrase)
            if ident.kid != self.builder.identity.kid:
                log.info("signing batches with identity %s from now on", ident.kid.hex())
                self.builder.identity = ident
        return True

    async def stop(self) -> None:
        """Seal what is open (the queue commits it on close) and stop the timer."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.seal()

    def status(self) -> dict[str, Any]:
        """Counters for ``status`` / ``$SYS``."""
        return {
            "sealed_batches": self.sealed_batches,
            "open_leaves": len(self._open),
            "next_batch_seq": self.builder.next_seq if self.builder else None,
            "sessions": {up: s.sessions_started for up, s in self.sealers.items()},
            "accelerator": "c" if accel.FASTPATH is not None else "python",
        }


def make_protector(
    gateway_id: str,
    rules: Sequence[ForwardRule],
    upstreams: Sequence[UpstreamSettings],
    settings: SecuritySettings,
    queue: ForwardQueue,
    data_dir: Path,
) -> Protector | None:
    """A :class:`Protector` if any rule has ``encrypt`` or ``sign``, else None."""
    if not any(r.encrypt or r.sign for r in rules):
        return None
    keys_dir = settings.keys_dir or data_dir / "keys"
    return Protector(gateway_id, settings, rules, upstreams, queue, keys_dir)
