"""Erasure of everything the gateway holds about one device / client id (issue 18 part 4).

Run with the gateway stopped (the data directory's lock is taken; a running gateway erases
through its HTTP API, :mod:`.erasure_live`, with the helpers here). Erased, each SQLite file
compacted afterwards (``store.erase.scrub``: secure_delete, checkpoint, VACUUM):

* ``broker.db``: the client's session, subscriptions, queued and in-flight deliveries, QoS 2
  state; deliveries to others of messages it published (origin); retained messages it
  published (origin; rows stored before origins were kept: those on a topic with the id as
  a level);
* ``forward.db``: queued upstream messages it published (rows queued before the queue kept
  publishers: those on a topic with the id as a level) (``queue = "erase"``, the default;
  ``"report"`` only counts them);
* ``ota/ota.sqlite``: incidents (and their verdicts) whose stream or document names it;
* ``rbac.sqlite``: the client's grants and group memberships;
* ``status.json`` when it names the id (the gateway writes it again);
* on request: its OSCORE context directory and an HTTP token.

Then every file left in the data directory is searched for the id and any hit is reported.
A receipt (what was erased, when; the device named by the SHA-256 of its id) is appended to
``audit/erasures.jsonl``, hash-chained and signed with the gateway's ML-DSA-65 identity when
``keys init`` made one; an erasure request with the same fields is queued for every upstream
on ``<topic_prefix>erasure`` so the cloud side can act. Messages already forwarded upstream
are beyond this gateway: that request is how the cloud learns of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..store.erase import scrub
from ..store.forward_queue import ORIGIN_WHERE
from ..store.queue_writer import SCHEMA as QUEUE_SCHEMA
from ..store.queue_writer import add_origin
from .datadir import lock_data_dir

__all__ = ["ErasureReport", "UnknownDevice", "check_ids", "erase_device", "erase_files",
           "erasure_requests", "finish"]

RECEIPTS = Path("audit") / "erasures.jsonl"
_LEVEL = "instr('/' || {col} || '/', ?) > 0"


class UnknownDevice(LookupError):
    """Nothing is held about this id (nothing was changed)."""


@dataclass
class ErasureReport:
    """What an erasure did: rows per store and table, files removed, what was left."""

    device_sha256: str
    erased: dict[str, int] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    receipt: dict[str, Any] | None = None
    #: a running gateway's erasure: how long it held the event loop and each store's writer
    pause_ms: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Rows erased plus files removed."""
        return sum(self.erased.values()) + len(self.removed)

    def as_dict(self) -> dict[str, Any]:
        """The report as the CLI prints it and the HTTP API answers it."""
        out = {"device_sha256": self.device_sha256, "erased": self.erased,
               "removed": self.removed, "reported": self.reported, "receipt": self.receipt}
        if self.pause_ms:
            out["pause_ms"] = self.pause_ms
        return out


def _broker_deletes(device: str) -> list[tuple[str, str, list[Any]]]:
    level = f"/{device}/"
    return [
        ("sessions", "DELETE FROM sessions WHERE client_id = ?", [device]),
        ("subscriptions", "DELETE FROM subscriptions WHERE client_id = ?", [device]),
        ("deliveries", "DELETE FROM deliveries WHERE client_id = ? OR origin = ?",
         [device, device]),
        ("inbound_qos2", "DELETE FROM inbound_qos2 WHERE client_id = ?", [device]),
        ("retained", "DELETE FROM retained WHERE origin = ? OR (origin IS NULL AND "
         + _LEVEL.format(col="topic") + ")", [device, level]),
    ]


def _ota_deletes(device: str) -> list[tuple[str, str, list[Any]]]:
    match = ("SELECT incident FROM feedback_incidents WHERE instr(doc, ?) > 0 OR "
             + _LEVEL.format(col="coalesce(stream, '')"))
    params = [device, f"/{device}/"]
    return [
        ("feedback_verdicts", f"DELETE FROM feedback_verdicts WHERE incident IN ({match})",
         params),
        ("feedback_incidents", f"DELETE FROM feedback_incidents WHERE incident IN ({match})",
         params),
    ]


def _rbac_deletes(device: str) -> list[tuple[str, str, list[Any]]]:
    return [
        ("grants", "DELETE FROM grants WHERE kind = 'client' AND name = ?", [device]),
        ("members", "DELETE FROM members WHERE kind = 'client' AND name = ?", [device]),
    ]


def _run(report: ErasureReport, store: str, path: Path,
         deletes: list[tuple[str, str, list[Any]]]) -> None:
    if not path.exists():
        return
    counts = scrub(path, [(sql, params) for _t, sql, params in deletes])
    for (table, _sql, _p), n in zip(deletes, counts, strict=True):
        if n > 0:
            report.erased[f"{store}:{table}"] = report.erased.get(f"{store}:{table}", 0) + n
    if store == "rbac" and any(n > 0 for n in counts):
        db = sqlite3.connect(path)  # the running rules are reloaded by generation
        with db:
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        db.close()


def _files_naming(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(p)
            except OSError:
                continue
    return hits


def _sign(data_dir: Path, body: bytes, passphrase: bytes | None) -> tuple[str | None, str | None,
                                                                          str | None]:
    """(kid hex, signature base64, why unsigned)."""
    from ..crypto.errors import KeyFileError, UnknownKeyError
    from ..crypto.keystore import KeyStore

    try:
        ident = KeyStore(data_dir / "keys").identity(passphrase)
    except (UnknownKeyError, KeyFileError, OSError, ValueError) as exc:
        return None, None, f"no usable gateway identity ({exc})"
    return ident.kid.hex(), base64.b64encode(ident.sign(body)).decode(), None


def _receipt(data_dir: Path, report: ErasureReport, passphrase: bytes | None,
             now: float) -> dict[str, Any]:
    path = data_dir / RECEIPTS
    path.parent.mkdir(parents=True, exist_ok=True)
    prev, seq = "0" * 64, 0
    if path.exists():
        lines = path.read_bytes().splitlines()
        if lines:
            prev = hashlib.sha256(lines[-1]).hexdigest()
            seq = int(json.loads(lines[-1])["seq"]) + 1
    doc: dict[str, Any] = {
        "seq": seq, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "device_sha256": report.device_sha256, "erased": report.erased,
        "removed": len(report.removed), "reported": report.reported, "prev": prev,
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    kid, sig, why = _sign(data_dir, body, passphrase)
    doc.update({"alg": "ML-DSA-65" if sig else None, "kid": kid, "sig": sig})
    if why:
        doc["unsigned"] = why
    with open(path, "ab") as fh:
        fh.write(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return doc


def erasure_requests(config: Config, report: ErasureReport) -> list[tuple[str, str, bytes]]:
    """(upstream, topic, payload) of the erasure request for every upstream: the receipt's
    fields, on ``<topic_prefix>erasure``."""
    receipt = report.receipt or {}
    payload = json.dumps({"type": "erasure", "gateway": config.gateway.id,
                          "device_sha256": report.device_sha256, "at": receipt.get("at"),
                          "erased": report.erased, "receipt_seq": receipt.get("seq")},
                         sort_keys=True).encode()
    return [(u.name, u.topic_prefix.replace("{gateway_id}", config.gateway.id) + "erasure",
             payload) for u in config.forwarding.upstreams]


def _request_upstream(config: Config, report: ErasureReport, now: float) -> int:
    """Queue the erasure request for every upstream; how many were queued."""
    requests = erasure_requests(config, report)
    if not requests:
        return 0
    db = sqlite3.connect(config.gateway.data_dir / "forward.db")
    try:
        db.executescript(QUEUE_SCHEMA)
        with db:
            for upstream, topic, payload in requests:
                size = len(topic.encode()) + len(payload)
                db.execute("INSERT INTO messages (upstream, priority, topic, payload, qos, "
                           "props, created, expires_at, size) VALUES (?, 0, ?, ?, 1, ?, ?, "
                           "NULL, ?)", (upstream, topic, payload, b"", now, size))
    finally:
        db.close()
    return len(requests)


def _forward_deletes(device: str) -> list[tuple[str, str, list[Any]]]:
    return [("messages", "DELETE FROM messages WHERE " + ORIGIN_WHERE, [device, f"/{device}/"])]


def _count_forward(path: Path, device: str) -> int:
    """Messages of ``device`` waiting in the forward queue at ``path`` (not erased)."""
    if not path.exists():
        return 0
    db = sqlite3.connect(path)
    try:
        add_origin(db)
        return int(db.execute("SELECT count(*) FROM messages WHERE " + ORIGIN_WHERE,
                              (device, f"/{device}/")).fetchone()[0])
    finally:
        db.close()


def _migrate_forward(path: Path) -> None:
    """A queue from before publishers were recorded gains ``origin`` (rows: NULL)."""
    if path.exists():
        db = sqlite3.connect(path)
        try:
            with db:
                add_origin(db)
        finally:
            db.close()


def erase_files(config: Config, device: str, report: ErasureReport, *, oscore: bool,
                token: str | None) -> None:
    """The stores the broker and the queue do not own (OTA feedback, RBAC grants,
    status.json) and, on request, the OSCORE context and an HTTP token."""
    data_dir = config.gateway.data_dir
    _run(report, "ota", data_dir / "ota" / "ota.sqlite", _ota_deletes(device))
    rbac = config.auth.rbac_db or data_dir / "rbac.sqlite"
    _run(report, "rbac", rbac, _rbac_deletes(device))
    status = data_dir / "status.json"
    if status.exists() and device.encode() in status.read_bytes():
        status.unlink()
        report.removed.append(str(status))
    if oscore and config.coap.oscore_dir is not None:
        ctx = config.coap.oscore_dir / device
        if ctx.is_dir() and ctx.resolve().parent == config.coap.oscore_dir.resolve():
            for f in ctx.iterdir():
                if f.is_file():
                    f.write_bytes(b"\x00" * f.stat().st_size)
            shutil.rmtree(ctx)
            report.removed.append(str(ctx))
    if token is not None and config.http.tokens_file is not None:
        from ..security.tokens import remove_token

        if remove_token(config.http.tokens_file, token):
            report.removed.append(f"token {token}")
        else:
            report.reported.append(f"token {token}: no such token")


def check_ids(device: str, queue: str) -> None:
    """Raise ValueError for an id or a queue mode that cannot be erased."""
    if not device or "\x00" in device:
        raise ValueError("a device id must be a non-empty client id")
    if queue not in ("erase", "report"):
        raise ValueError('queue must be "erase" or "report"')


def finish(config: Config, device: str, report: ErasureReport, passphrase: bytes | None,
           when: float) -> None:
    """Raise UnknownDevice when nothing was erased; else report files still naming the id
    and write the signed receipt."""
    data_dir = config.gateway.data_dir
    if report.total == 0:
        raise UnknownDevice(f"nothing is held about {device!r} in {data_dir}")
    for hit in _files_naming(data_dir, device.encode()):
        report.reported.append(f"{hit.relative_to(data_dir)} still holds the id")
    if config.forwarding.forward:  # (a local broker only has forwarded nothing)
        report.reported.append("messages already forwarded upstream: an erasure request "
                               "tells the cloud side")
    report.receipt = _receipt(data_dir, report, passphrase, when)


def erase_device(config: Config, device: str, *, oscore: bool = False,
                 token: str | None = None, queue: str = "erase",
                 passphrase: bytes | None = None, now: float | None = None) -> ErasureReport:
    """Erase what is held about ``device`` (a client id); raises UnknownDevice when nothing
    is, DataDirLocked while a gateway runs on the data directory."""
    check_ids(device, queue)
    when = time.time() if now is None else now
    data_dir = config.gateway.data_dir
    lock = lock_data_dir(data_dir)
    try:
        report = ErasureReport(hashlib.sha256(device.encode()).hexdigest())
        _run(report, "broker", data_dir / "broker.db", _broker_deletes(device))
        forward = data_dir / "forward.db"
        _migrate_forward(forward)
        if queue == "erase":
            _run(report, "forward", forward, _forward_deletes(device))
        elif n := _count_forward(forward, device):
            report.reported.append(f"forward queue: {n} queued messages kept (queue=report)")
        erase_files(config, device, report, oscore=oscore, token=token)
        finish(config, device, report, passphrase, when)
        queued = _request_upstream(config, report, when)
        if queued:
            report.reported.append(f"erasure request queued for {queued} upstream(s)")
        return report
    finally:
        lock.close()
