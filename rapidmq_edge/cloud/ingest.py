"""``rapidmq-edge cloud ingest``: subscribe upstream, verify, decrypt, write, report.

I/O shell around :class:`~rapidmq_edge.cloud.verify.Ingest`: one :class:`Subscriber` (data
under a shared subscription when ``group`` is set, plus direct subscriptions to the
``_batch``/``_session`` topics so every consumer of the group sees every batch and session
header), a sink, and a report stream (JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..crypto.batch_message import BATCH_SUFFIX, SESSION_SUFFIX
from ..crypto.keys import IdentityPublicKey, RecipientKeyring, VerifierKeyring
from ..crypto.keystore import KeyStore
from .sinks import SqliteSink, open_sink
from .subscriber import Subscriber
from .verify import Ingest, Report

__all__ = ["IngestOptions", "filters_for", "run_ingest"]

log = logging.getLogger(__name__)


@dataclass
class IngestOptions:
    """Everything ``cloud ingest`` needs."""

    upstream: str
    keys_dir: Path
    out: Path
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


def filters_for(prefix: str, group: str | None) -> list[tuple[str, int]]:
    """Subscriptions: all of the prefix (shared if ``group``), plus direct control topics."""
    pfx = prefix.replace("{gateway_id}", "+")
    if group is None:
        return [(pfx + "#", 1)]
    return [
        (f"$share/{group}/{pfx}#", 1),
        (pfx + BATCH_SUFFIX, 1),
        (pfx + SESSION_SUFFIX, 1),
    ]


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

    ``ready`` is set once the subscriptions are acknowledged."""
    identities, recipients = load_keys(opts)
    sink = open_sink(opts.out)
    ingest = Ingest(
        identities, recipients, prefix=opts.prefix, grace=opts.grace,
        chain_start=opts.chain_start, seen=sink.has,
        report_missing=opts.group is None or isinstance(sink, SqliteSink),
    )
    report_file: IO[str] | None = open(opts.reports, "a") if opts.reports else None  # noqa: SIM115
    last = time.monotonic()
    key_files = [opts.keys_dir / "keyring.json", *opts.trust]
    stamp = _mtimes(key_files)
    checked = time.monotonic()

    def on_publish(topic: str, payload: bytes, props: dict[str, str]) -> None:
        nonlocal last
        last = time.monotonic()
        ingest.publish(topic, payload, props.get("rmq-id"))

    def emit(reports: list[Report]) -> None:
        for r in reports:
            line = json.dumps(r.as_dict(), separators=(",", ":"))
            log.warning("%s", line)
            if report_file is not None:
                report_file.write(line + "\n")
                report_file.flush()
            if on_report is not None:
                on_report(r)

    client_id = opts.client_id or f"rmq-ingest-{os.getpid()}"
    sub = Subscriber(
        opts.upstream, client_id, filters_for(opts.prefix, opts.group), on_publish,
        username=opts.username, password=opts.password,
    )
    task = asyncio.get_running_loop().create_task(sub.run())

    async def mark_ready() -> None:
        nonlocal last
        await sub.subscribed.wait()
        last = time.monotonic()  # the idle clock starts once subscribed
        if ready is not None:
            ready.set()

    marker = asyncio.get_running_loop().create_task(mark_ready())
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                now_stamp = _mtimes(key_files)
                if now_stamp != stamp:  # keys rotated / trust files replaced: reload
                    stamp = now_stamp
                    ingest.set_keys(*load_keys(opts))
            verified, reports = ingest.poll()
            if verified:
                sink.write(verified)
            emit(reports)
            if opts.idle_exit is not None and time.monotonic() - last >= opts.idle_exit:
                break
        verified, reports = ingest.finish()
        if verified:
            sink.write(verified)
        emit(reports)
    finally:
        sub.stop()
        marker.cancel()
        await asyncio.gather(task, marker, return_exceptions=True)
        sink.close()
        if report_file is not None:
            report_file.close()
    return dict(ingest.counts, received=sub.received)
