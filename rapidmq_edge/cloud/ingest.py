"""``rapidmq-edge cloud ingest``: subscribe upstream, verify, decrypt, write, report.

I/O shell around :class:`~rapidmq_edge.cloud.verify.Ingest`: one source — a
:class:`Subscriber` on a persistent MQTT session (data under a shared subscription when
``group`` is set) or a :class:`~rapidmq_edge.cloud.jetstream_source.JetStreamSource` (a durable
pull consumer on NATS' own MQTT stream) — a durable :class:`~rapidmq_edge.cloud.state.Store`
and a report stream (JSON lines). Both sources hand over :class:`Delivery` items and take them
back through ``acknowledge`` after the commit.

Acknowledge after it is safe: each chunk of received messages is verified, then committed in
one transaction (rows, reports, batch headers, messages still waiting for their batch), and
only then acknowledged upstream, in arrival order. A kill -9 before the commit leaves the
chunk unacknowledged (the broker redelivers it to the persistent session); after it, the
restarted consumer reloads its waiting messages and the stored headers.

Batch and session headers: a shared state (SQLite file, PostgreSQL) passes them between the
consumers of a group, so a header and its messages may land on different consumers; with a
JSON Lines sink each consumer also subscribes to the header topics directly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Protocol

from ..crypto.batch_message import BATCH_SUFFIX, SESSION_SUFFIX
from ..crypto.keys import IdentityPublicKey, RecipientKeyring, VerifierKeyring
from ..crypto.keystore import KeyStore
from ..mqtt.id_frame import IdFrameError
from ..mqtt.packets import MQTT_5
from ..telemetry import RepeatedLog
from .sinks import JsonlSink
from .state import Restored, SqliteStore, Step, Store
from .subscriber import Delivery, Subscriber
from .verify import Ingest, Report, carried_id, sid_of_header, sid_of_message

__all__ = ["IngestOptions", "Source", "filters_for", "in_partition", "open_store", "restore_into",
           "run_ingest"]

log = logging.getLogger(__name__)


@dataclass
class IngestOptions:
    """Everything ``cloud ingest`` needs."""

    upstream: str
    keys_dir: Path
    #: FILE.jsonl, FILE.sqlite or a postgresql:// URL
    out: Path | str
    trust: tuple[Path, ...] = ()
    prefix: str = "edge/{gateway_id}/"
    group: str | None = None
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    reports: Path | None = None
    grace: float = 5.0
    chain_start: int | None = None
    idle_exit: float | None = None
    passphrase: bytes | None = None
    #: persistent session: the broker keeps what was not acknowledged this long (0: clean)
    session_expiry: int = 7 * 86400
    protocol: int = MQTT_5  # 4: MQTT 3.1.1 (clean session off when session_expiry > 0)
    #: a message no batch header covers is reported ``missing-batch`` after this many s
    #: (None: ``unverifiable`` after ``grace``)
    batch_timeout: float | None = None
    max_pending: int = 100_000  # bound of the waiting messages (oldest: missing-batch)
    chunk: int = 512  # messages per commit / acknowledgement
    #: headers reloaded at start (seconds back; plus each gateway's newest session header and
    #: the older session headers of waiting messages)
    horizon: float = 6 * 3600.0
    lease: float = 60.0  # a silent consumer's waiting messages are adopted after this
    #: (index, count): handle only the gateways whose id hashes to ``index`` (brokers without
    #: shared subscriptions: every consumer subscribes to all, each keeps its share)
    partition: tuple[int, int] | None = None
    #: "mqtt" (a session on ``upstream``) or "jetstream" (a durable pull consumer)
    source: str = "mqtt"
    servers: tuple[str, ...] = ()  # jetstream: nats:// URLs of the cluster
    stream: str = "$MQTT_msgs"  # jetstream: NATS' MQTT message stream
    durable: str | None = None  # jetstream: the durable consumer every process pulls from
    ack_wait: float = 10.0  # jetstream: redelivered if not acknowledged (committed) by then
    max_ack_pending: int = 4096  # jetstream: fetched, unacknowledged, across the durable


class Source(Protocol):
    """What :func:`run_ingest` consumes: an MQTT session or a JetStream durable."""

    subscribed: asyncio.Event
    received: int

    async def take(self, limit: int, timeout: float) -> list[Delivery]: ...

    async def acknowledge(self, items: Sequence[Delivery]) -> int: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...


def filters_for(prefix: str, group: str | None,
                shared_headers: bool = False) -> list[tuple[str, int]]:
    """Subscriptions: all of the prefix (shared if ``group``), plus direct control topics
    unless ``shared_headers`` (the state passes headers between the group's consumers)."""
    pfx = prefix.replace("{gateway_id}", "+")
    if group is None:
        return [(pfx + "#", 1)]
    if shared_headers:
        return [(f"$share/{group}/{pfx}#", 1)]
    return [
        (f"$share/{group}/{pfx}#", 1),
        (pfx + BATCH_SUFFIX, 1),
        (pfx + SESSION_SUFFIX, 1),
    ]


async def open_store(out: Path | str) -> Store:
    """``postgresql://`` -> PostgreSQL; ``.sqlite``/``.db`` -> that file; else JSON Lines
    with its state in ``<out>.state.sqlite``."""
    text = str(out)
    if isinstance(out, str) and text.startswith(("postgresql://", "postgres://")):
        from .pgstore import PgStore

        return await PgStore.connect(text)
    path = Path(out)
    if path.suffix in (".sqlite", ".sqlite3", ".db"):
        return SqliteStore(path)
    return SqliteStore(path.with_name(path.name + ".state.sqlite"), JsonlSink(path))


def default_client_id(opts: IngestOptions) -> str:
    """Stable across restarts (it names the broker session and the waiting set):
    ``rmq-ingest-<host>[-<group>][-p<index>]``; give each consumer on one host its own."""
    out = f"rmq-ingest-{os.uname().nodename}"
    if opts.group:
        out += f"-{opts.group}"
    if opts.durable:
        out += f"-{opts.durable}"
    if opts.partition is not None:
        out += f"-p{opts.partition[0]}"
    return out


def open_source(opts: IngestOptions, client_id: str, shared_state: bool) -> Source:
    """The source ``opts`` names (``--source``)."""
    if opts.source == "jetstream":
        from .jetstream_source import JetStreamSource, filter_to_subject

        return JetStreamSource(
            opts.servers, opts.stream, opts.durable or "",
            filter_to_subject(filters_for(opts.prefix, None)[0][0]),
            ack_wait=opts.ack_wait, max_ack_pending=opts.max_ack_pending,
            fetch=max(16, min(opts.chunk, opts.max_ack_pending)), user=opts.username,
            password=opts.password, name=client_id)
    if opts.source != "mqtt":
        raise ValueError(f"unknown source {opts.source!r} (mqtt or jetstream)")
    return Subscriber(
        opts.upstream, client_id,
        filters_for(opts.prefix, opts.group, shared_state and opts.partition is None), None,
        username=opts.username, password=opts.password, version=opts.protocol,
        session_expiry=opts.session_expiry, receive_maximum=max(opts.chunk * 2, 64),
    )


def gateway_of(prefix: str, topic: str) -> str | None:
    """The gateway id in ``topic`` (``prefix`` holds ``{gateway_id}``), None if it has none."""
    head, _, tail = prefix.partition("{gateway_id}")
    if not tail or not topic.startswith(head):
        return None
    gw, sep, rest = topic[len(head):].partition(tail[0])
    return gw if sep and rest.startswith(tail[1:]) else None


async def restore_into(store: Store, ingest: Ingest, consumer: str, horizon: float,
                       page: int = 500) -> Restored:
    """Feed ``ingest`` the stored headers a restarted consumer needs, bounded by ``horizon``:
    batches and session headers stored within it, the newest session header of each gateway
    (a session may outlive the horizon), and older session headers only where one of the
    consumer's waiting messages is sealed in that session (found by a paged scan that keeps
    just those). Returns the restore (waiting messages, cursor); they are not fed yet."""
    restored = await store.restore(consumer, horizon)
    known: set[bytes] = set()
    for kind, payload in restored.control:
        ingest.add_control(kind, payload)
        sid = sid_of_header(payload) if kind == "session" else None
        if sid is not None:
            known.add(sid)
    need = {s for _, _, p in restored.pending if (s := sid_of_message(p)) is not None} - known
    after = 0
    while need:
        rows = await store.old_sessions(horizon, after, page)
        for pos, payload in rows:
            after = pos
            sid = sid_of_header(payload)
            if sid in need:
                need.discard(sid)
                ingest.add_control("session", payload)
        if len(rows) < page:
            break
    ingest.take_control()  # stored already
    return restored


def in_partition(gateway_id: str, part: tuple[int, int]) -> bool:
    """Whether ``gateway_id`` belongs to partition ``part`` = (index, count): CRC-32 mod count."""
    return zlib.crc32(gateway_id.encode()) % part[1] == part[0]


def _row(d: Delivery) -> tuple[str, str, bytes]:
    """(message id or "", topic, payload) of a delivery: the id from the ``rmq-id`` property
    (MQTT 5) or the unwrapped id frame (3.1.1); a malformed frame stays as it came (no id:
    :meth:`Ingest.publish` reports it ``unverifiable`` with the reason)."""
    try:
        mid, payload = carried_id(d.props.get("rmq-id"), d.payload)
    except IdFrameError:
        return "", d.topic, d.payload
    return mid or "", d.topic, payload


def _mtimes(paths: list[Path]) -> list[int]:
    out = []
    for p in paths:
        try:
            out.append(p.stat().st_mtime_ns)
        except OSError:
            out.append(0)
    return out


def load_keys(opts: IngestOptions) -> tuple[VerifierKeyring, RecipientKeyring]:
    """Identity public keys (``--trust`` files + the keys dir) and the recipient private keys."""
    store = KeyStore(opts.keys_dir)
    identities = store.verifier_keyring()
    for path in opts.trust:
        identities.add(IdentityPublicKey.from_cose(path.read_bytes()))
    passphrase = opts.passphrase
    if passphrase is None and os.environ.get("RAPIDMQ_KEY_PASSPHRASE"):
        passphrase = os.environ["RAPIDMQ_KEY_PASSPHRASE"].encode()
    return identities, store.recipient_keyring(passphrase)


async def run_ingest(
    opts: IngestOptions, *, on_report: Callable[[Report], None] | None = None,
    stop: asyncio.Event | None = None, ready: asyncio.Event | None = None,
) -> dict[str, int]:
    """Run until ``stop`` is set (or ``idle_exit`` seconds without traffic); returns counters.

    ``ready`` is set once the subscriptions are acknowledged. Waiting messages stay in the
    state at ``stop`` (a restart resumes them); ``idle_exit`` reports them (a batch run)."""
    identities, recipients = load_keys(opts)
    client_id = opts.client_id or default_client_id(opts)
    # a JetStream durable hands any message to any consumer: every consumer keeps every batch;
    # --partition then only names the judge of a gateway's chain (its batch-seq gaps)
    shared_log = opts.source == "jetstream"
    part = None if opts.partition is None else partial(in_partition, part=opts.partition)
    store = await open_store(opts.out)
    written: set[str] = set()  # of the chunk being fed: already in the sink
    ingest = Ingest(
        identities, recipients, prefix=opts.prefix, grace=opts.grace,
        chain_start=opts.chain_start, seen=written.__contains__, defer_missing=True,
        # separate JSONL states in a group cannot tell a message another consumer has
        report_missing=opts.group is None or store.shared,
        batch_timeout=opts.batch_timeout,
        owns=None if shared_log else part, judges=part if shared_log else None,
    )
    restored = await restore_into(store, ingest, client_id, opts.horizon)
    cursor = restored.cursor
    staged: set[str] = set()

    async def feed(rows: list[tuple[str, str, bytes]]) -> None:
        written.clear()
        written.update(await store.written([m for m, _, _ in rows]))
        for mid, topic, payload in rows:
            ingest.publish(topic, payload, mid)
        staged.update(m for m, _, _ in rows)

    await feed(restored.pending)
    report_file: IO[str] | None = open(opts.reports, "a") if opts.reports else None  # noqa: SIM115
    key_files = [opts.keys_dir / "keyring.json", *opts.trust]
    stamp = _mtimes(key_files)
    repeated = RepeatedLog(log)
    deferred: list[tuple[float, list[tuple[str, str, int]]]] = []
    missing_after = max(opts.grace, opts.batch_timeout or 0.0)

    def emit(reports: list[Report]) -> None:
        for r in reports:
            line = json.dumps(r.as_dict(), separators=(",", ":"))
            repeated(f"report:{r.kind}", logging.WARNING, "%s", line)
            if report_file is not None:
                report_file.write(line + "\n")
                report_file.flush()
            if on_report is not None:
                on_report(r)

    def mine(d: Delivery) -> bool:
        if opts.partition is None or shared_log:
            return True
        gw = gateway_of(opts.prefix, d.topic)
        return gw is None or in_partition(gw, opts.partition)

    async def step(items: list[Delivery], final: bool = False) -> None:
        rows = [_row(d) for d in items if mine(d)]
        if rows:
            written.clear()
            ids = [m for m, _, _ in rows if m]
            written.update(await store.written(ids) if ids else ())
            for mid, topic, payload in rows:
                ingest.publish(topic, payload, mid or None)
        ingest.expire_oldest(opts.max_pending)
        verified, reports = ingest.finish() if final else ingest.poll()
        now = time.monotonic()
        if ingest.deferred:
            deferred.append((now + (0 if final else missing_after), ingest.deferred))
            ingest.deferred = []
        while deferred and (final or deferred[0][0] <= now):
            cands = deferred.pop(0)[1]
            lost = set(await store.unaccounted([m for m, _, _ in cands]))
            reports += [Report("missing-message", "listed in a signed batch, never arrived",
                               m, g, s) for m, g, s in cands if m in lost]
            for _ in lost:
                ingest.counts["missing-message"] = ingest.counts.get("missing-message", 0) + 1
        waiting = ingest.waiting_ids()
        stage: dict[str, tuple[str, str, bytes]] = {
            m: (m, t, p) for m, t, p in rows if m in waiting and m not in staged}
        unstage = staged - waiting
        control = ingest.take_control()
        if verified or reports or control or stage or unstage:
            await store.commit(client_id, Step(verified, reports, control, list(stage.values()),
                                               sorted(unstage)))
            staged.difference_update(unstage)
            staged.update(stage)
        emit(reports)
        await sub.acknowledge(items)  # after the commit, in arrival order

    try:
        sub = open_source(opts, client_id, store.shared)
    except ValueError:
        await store.close()
        raise
    task = asyncio.get_running_loop().create_task(sub.run())
    last = time.monotonic()

    async def mark_ready() -> None:
        nonlocal last
        await sub.subscribed.wait()
        last = time.monotonic()  # the idle clock starts once subscribed
        if ready is not None:
            ready.set()

    marker = asyncio.get_running_loop().create_task(mark_ready())
    stop = stop or asyncio.Event()
    checked = shared_at = adopted_at = time.monotonic()
    try:
        while not stop.is_set():
            items = await sub.take(opts.chunk, 0.05)
            now = time.monotonic()
            if items:
                last = now
            if now - checked >= 0.5:
                checked = now
                now_stamp = _mtimes(key_files)
                if now_stamp != stamp:  # keys rotated / trust files replaced: reload
                    stamp = now_stamp
                    ingest.set_keys(*load_keys(opts))
            if store.shared and now - shared_at >= 0.2:  # headers other consumers received
                shared_at = now
                rows, cursor = await store.control_since(cursor)
                for kind, payload in rows:
                    ingest.add_control(kind, payload)
            if store.shared and now - adopted_at >= opts.lease / 3:
                adopted_at = now
                adopted = await store.adopt(client_id, opts.lease)
                if adopted:
                    log.warning("adopted %d waiting messages of silent consumers", len(adopted))
                    await feed(adopted)
            await step(items)
            if opts.idle_exit is not None and time.monotonic() - last >= opts.idle_exit:
                await step([], final=True)
                break
    finally:
        sub.stop()
        marker.cancel()
        await asyncio.gather(task, marker, return_exceptions=True)
        await store.close()
        if report_file is not None:
            report_file.close()
    return dict(ingest.counts, received=sub.received)
