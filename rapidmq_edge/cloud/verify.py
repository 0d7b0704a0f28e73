"""Cloud-side verification of forwarded messages (sans-I/O): batches, leaves, envelopes.

:class:`Ingest` is fed what arrives from the upstream broker (``publish(topic, payload,
message_id)``) and a clock (``poll(now)``); it returns :class:`Verified` messages — each one
listed in a batch whose ML-DSA-65 signature verified, and either matching its signed leaf or
(batches without leaves) authenticated by its AEAD under a session header the gateway signed,
or hashing with the rest of its batch to the signed root — and :class:`Report` events for
everything else. Nothing unverifiable is ever returned as verified: it is reported
(tampered, unverifiable, wrong key, missing...).

Report kinds: ``tampered`` (bytes do not match the signed leaf, AEAD fails, bad batch
signature or manifest), ``wrong-key`` (session header / device envelope for a key not held,
batch signed by an unknown identity), ``unverifiable`` (no signed batch covers the message
within ``grace`` seconds, or its session header never came), ``missing-message`` (a signed
batch lists an id that did not arrive within ``grace``), ``missing-batch`` (a gap in the batch
sequence, or no batch covered a message within ``batch_timeout``: that message still waits and
verifies if its batch comes later), ``chain-broken`` (prev_root does not link), ``replay`` (an
envelope sequence number accepted before), ``duplicate`` (same id again; dropped, informational).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..crypto import cose
from ..crypto.batch import BatchHeader, verify_batch
from ..crypto.batch_message import BATCH_SUFFIX, SESSION_SUFFIX, decode_batch_message, fast_leaf
from ..crypto.e2e import device_context, is_device_envelope, open_device_message
from ..crypto.envelope import Opener, parse_envelope, parse_session_header
from ..crypto.errors import (
    CryptoError,
    MalformedError,
    ReplayError,
    SignatureError,
    TamperedError,
    UnknownKeyError,
    WrongRecipientError,
)
from ..crypto.keys import KID_SIZE, RecipientKeyring, VerifierKeyring
from ..crypto.merkle import MerkleTree
from ..crypto.signed_session import is_signed_session, open_signed_session
from ..mqtt.id_frame import IdFrameError, decode_id_frame, is_id_frame

__all__ = ["Ingest", "Report", "Verified", "carried_id", "sid_of_header", "sid_of_message"]

HEARTBEAT_SUFFIX = "_heartbeat"


@dataclass(frozen=True)
class Verified:
    """A message whose origin and integrity were proven; ``payload`` is the plaintext."""

    message_id: str
    gateway_id: str
    topic: str
    payload: bytes
    batch: int
    encrypted: bool
    device_e2e: bool
    #: how the batch covered it: ``leaf`` (signed leaf), ``session`` (AEAD of a gateway-signed
    #: session listed in the signed batch), ``root`` (the batch's messages hash to the root)
    proof: str = ""


@dataclass(frozen=True)
class Report:
    """Something that was not accepted, or is missing."""

    kind: str
    detail: str
    message_id: str | None = None
    gateway_id: str | None = None
    batch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class _Batch:
    header: BatchHeader
    ids: list[str]
    index: dict[str, int]
    leaves: list[bytes] | None
    arrived: float
    done: set[str] = field(default_factory=set)
    reported: bool = False
    #: no leaves: leaf of each message verified by its signed session (for a root check of
    #: the batch's other, unencrypted messages)
    leaf_of: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Gateway:
    batches: dict[int, _Batch] = field(default_factory=dict)
    owner: dict[str, int] = field(default_factory=dict)  # message id -> batch seq
    checked_to: int | None = None  # highest seq whose link to the previous was checked
    low: int | None = None  # first batch seq of this chain seen (or expected)


class Ingest:
    """Verification state of one consumer (all gateways whose identities are trusted)."""

    def __init__(
        self,
        identities: VerifierKeyring,
        recipients: RecipientKeyring,
        *,
        prefix: str = "edge/{gateway_id}/",
        grace: float = 5.0,
        chain_start: int | None = None,
        seen: Callable[[str], bool] | None = None,
        report_missing: bool = True,
        defer_missing: bool = False,
        batch_timeout: float | None = None,
        owns: Callable[[str], bool] | None = None,
        judges: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identities = identities
        self.opener = Opener(recipients, replay_window=1 << 16)
        self.recipients = recipients
        self.prefix = prefix
        self.grace = grace
        self.chain_start = chain_start
        self.seen = seen or (lambda mid: False)
        self.report_missing = report_missing
        #: missing-message candidates go to :attr:`deferred` (checked against shared state)
        self.defer_missing = defer_missing
        self.deferred: list[tuple[str, str, int]] = []  # (message id, gateway, batch seq)
        #: a message no batch covers is reported ``missing-batch`` after this many seconds
        #: (and waits on: a later batch still verifies it), a gap in the batch seq and a
        #: message without its session header too (None: ``unverifiable`` / the gap / the
        #: session after ``grace``)
        self.batch_timeout = batch_timeout
        #: the gateways this consumer handles (``--partition``; None: all): batches of other
        #: gateways (read from a shared state) are ignored, their chains are not its to judge
        self.owns = owns
        #: the gateways whose batch-seq gaps this consumer reports (None: all): with a shared
        #: JetStream durable any consumer gets any message, so every one keeps every batch
        #: (``owns`` None) and only the judge of a gateway's chain reports its gaps
        self.judges = judges
        #: batches / session headers accepted since the last :meth:`take_control`
        self.accepted: list[tuple[str, bytes, str, int | None]] = []
        self._control_seen: set[bytes] = set()
        self.clock = clock
        self.gateways: dict[str, _Gateway] = {}
        self.delivered: set[str] = set()
        self._arrived: set[str] = set()  # ids seen (verified or not) of batches not yet closed
        self._waiting: dict[str, list[tuple[str, bytes, float]]] = {}
        #: waiting messages already reported ``missing-batch`` (they wait on for the batch)
        self._overdue: set[str] = set()
        self._no_session: dict[str, tuple[str, bytes, _Batch, float]] = {}
        #: session headers / batches for keys not held (yet): retried after set_keys
        self._held: list[tuple[str, bytes, float, str]] = []
        self._proof: dict[str, str] = {}  # proof of messages parked for their session header
        self.counts: dict[str, int] = {"verified": 0, "batches": 0, "sessions": 0}
        self._out: list[Verified] = []
        self._reports: list[Report] = []

    # -- input -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, message_id: str | None) -> None:
        """One PUBLISH from the upstream: ``message_id`` = the ``rmq-id`` user property (MQTT
        5); None: the id is looked for in the payload's id frame (MQTT 3.1.1, see
        :func:`carried_id`), a malformed frame is reported ``unverifiable``."""
        last = topic.rsplit("/", 1)[-1]
        if last == SESSION_SUFFIX:
            self._session(payload)
        elif last == BATCH_SUFFIX:
            self._batch(payload)
        elif last == HEARTBEAT_SUFFIX:
            return
        else:
            if message_id is None:
                try:
                    message_id, payload = carried_id(None, payload)
                except IdFrameError as exc:
                    self._report("unverifiable", f"message on {topic!r}: malformed id frame "
                                 f"({exc})")
                    return
            if message_id is None or ":" not in message_id:
                self._report("unverifiable", f"message on {topic!r} has no message id "
                             "(rmq-id user property or id frame)")
            else:
                self._message(topic, payload, message_id)

    def set_keys(self, identities: VerifierKeyring, recipients: RecipientKeyring) -> None:
        """New key rings (rotation); held session headers and batches are retried."""
        self.identities = identities
        self.recipients = self.opener.keyring = recipients
        held, self._held = self._held, []
        for kind, payload, t0, _detail in held:
            (self._session if kind == "session" else self._batch)(payload, t0)

    def poll(self, now: float | None = None) -> tuple[list[Verified], list[Report]]:
        """Time-based reports (past ``grace``) and everything produced since the last poll."""
        now = self.clock() if now is None else now
        keep = []
        for item in self._held:
            if now - item[2] >= self.grace:
                self._report("wrong-key", item[3])
            else:
                keep.append(item)
        self._held = keep
        overdue = self._overdue
        for mid, cands in list(self._waiting.items()):
            if mid in overdue:
                continue  # reported; waits on for its batch (which takes it out of overdue)
            seq = self._owner_any(mid).get(mid)
            wait = self.grace if seq is not None or self.batch_timeout is None \
                else self.batch_timeout
            if now - cands[0][2] < wait:
                continue
            if seq is None and self.batch_timeout is not None:
                # reported, and kept: a batch held up longer than this (an outage of the
                # gateway's uplink) still verifies it; --max-pending bounds the waiting set
                overdue.add(mid)
                self._report("missing-batch", f"no signed batch covered this message "
                             f"within {self.batch_timeout:g} s (it waits on for one)",
                             mid, _gw(mid))
                continue
            del self._waiting[mid]
            if seq is None:
                self._report("unverifiable", "no signed batch covers this message", mid, _gw(mid))
            else:  # "ids" manifest: a batch verifies only as a whole
                self._report("unverifiable", "its signed batch is incomplete (ids manifest: "
                             "every message of the batch is needed)", mid, _gw(mid), seq)
        # a session header travels like a batch header (class 0, newest first after an
        # outage, redelivered late by a broker): its messages wait as long as for a batch
        header_wait = self.batch_timeout or self.grace
        for mid, (_t, _p, b, t0) in list(self._no_session.items()):
            if now - t0 >= header_wait:
                del self._no_session[mid]
                self._proof.pop(mid, None)
                self._report("unverifiable", "session header never arrived", mid, _gw(mid),
                             b.header.seq)
        for gw_id, gw in self.gateways.items():
            self._check_chain(gw_id, gw, now)
            for b in gw.batches.values():
                if b.reported or now - b.arrived < self.grace:
                    continue
                b.reported = True
                arrived = self._arrived
                lost = [m for m in b.ids if m not in arrived and not self.seen(m)]
                if self.defer_missing and self.report_missing:
                    self.deferred += [(m, gw_id, b.header.seq) for m in lost]
                for m in lost if self.report_missing and not self.defer_missing else ():
                    self._report("missing-message", "listed in a signed batch, never arrived",
                                 m, gw_id, b.header.seq)
                # closed: later copies are caught by the sink (seen) instead of memory
                arrived.difference_update(b.ids)
                self.delivered.difference_update(b.ids)
        if self._overdue:
            self._overdue.intersection_update(self._waiting)
        out, reports = self._out, self._reports
        self._out, self._reports = [], []
        return out, reports

    def waiting_ids(self) -> set[str]:
        """Ids of messages held for a batch header, a session header or the rest of a batch."""
        return set(self._waiting) | set(self._no_session)

    def expire_oldest(self, keep: int) -> None:
        """Bound: report the oldest waiting messages ``missing-batch`` until ``keep`` remain."""
        over = len(self._waiting) + len(self._no_session) - keep
        if over <= 0:
            return
        ages = sorted([(c[0][2], m) for m, c in self._waiting.items()]
                      + [(v[3], m) for m, v in self._no_session.items()])
        for _t, mid in ages[:over]:
            self._waiting.pop(mid, None)
            held = self._no_session.pop(mid, None)
            self._report("missing-batch", f"dropped from the waiting set (bound {keep} reached)"
                         " before its batch could be verified", mid, _gw(mid),
                         held[2].header.seq if held else None)

    def add_control(self, kind: str, payload: bytes) -> None:
        """A stored batch (``kind`` "batch") or session header ("session"), e.g. one another
        consumer of the group received; copies are ignored."""
        (self._batch if kind == "batch" else self._session)(payload)

    def take_control(self) -> list[tuple[str, bytes, str, int | None]]:
        """(kind, payload, gateway, batch seq) of every batch / session accepted since the
        last call: what a shared state stores for the other consumers (and the audit chain)."""
        out, self.accepted = self.accepted, []
        return out

    def finish(self) -> tuple[list[Verified], list[Report]]:
        """Report everything still pending as if ``grace`` had passed."""
        return self.poll(self.clock() + self.grace + 1e9)

    # -- sessions and batches ----------------------------------------------------------

    def _remember(self, kind: str, payload: bytes, gateway_id: str, seq: int | None) -> None:
        key = hashlib.sha256(payload).digest()
        if key not in self._control_seen:
            self._control_seen.add(key)
            self.accepted.append((kind, payload, gateway_id, seq))

    def _session(self, payload: bytes, t0: float | None = None) -> None:
        if hashlib.sha256(payload).digest() in self._control_seen:
            return
        signer = None
        try:
            header = payload
            if is_signed_session(payload):
                header, signer = open_signed_session(payload, self.identities)
            info = self.opener.add_session(header, signer)
        except UnknownKeyError as exc:
            self._hold("session", payload, t0, f"session header signed by an untrusted "
                       f"identity: {exc}")
            return
        except WrongRecipientError as exc:
            self._hold("session", payload, t0, f"session header: {exc}")
            return
        except CryptoError as exc:
            self._report("tampered", f"session header: {exc}")
            return
        self.counts["sessions"] += 1
        self._remember("session", payload, info.gateway_id, None)
        sid = info.session_id
        for mid, (topic, data, b, _t0) in list(self._no_session.items()):
            if _sid_of(data) == sid:
                del self._no_session[mid]
                self._accept(topic, data, mid, b)
        if signer is not None:  # messages of batches without leaves waited for this session
            for mid, cands in list(self._waiting.items()):
                seq = self._owner_any(mid).get(mid)
                if seq is not None and _sid_of(cands[0][1]) == sid:
                    b = self.gateways[_gw(mid)].batches[seq]
                    if self._by_session(cands[0][0], cands[0][1], mid, b):
                        del self._waiting[mid]

    def _hold(self, kind: str, payload: bytes, t0: float | None, detail: str) -> None:
        if not any(h[1] == payload for h in self._held):
            self._held.append((kind, payload, self.clock() if t0 is None else t0, detail))

    def _batch(self, payload: bytes, t0: float | None = None) -> None:
        if hashlib.sha256(payload).digest() in self._control_seen:
            return  # a copy (direct + shared subscription, shared state, redelivery)
        try:
            signed, qids, leaves = decode_batch_message(payload)
            header = verify_batch(signed, self.identities)
        except UnknownKeyError as exc:
            self._hold("batch", payload, t0, f"batch signed by an untrusted identity: {exc}")
            return
        except (SignatureError, MalformedError) as exc:
            self._report("tampered", f"batch: {exc}")
            return
        gw_id = header.gateway_id
        if self.owns is not None and not self.owns(gw_id):
            return  # another partition's gateway
        ids = [f"{gw_id}:{q}" for q in qids]
        if len(ids) != header.count or not ids or ids[0] != header.first_id \
                or ids[-1] != header.last_id:
            self._report("tampered", "batch manifest ids do not match the signed header",
                         gateway_id=gw_id, batch=header.seq)
            return
        leaf_list = None
        if leaves is not None:
            leaf_list = [leaves[i:i + 32] for i in range(0, len(leaves), 32)]
            if len(leaf_list) != header.count or MerkleTree(leaf_list).root != header.root:
                self._report("tampered", "batch manifest leaves do not hash to the signed root",
                             gateway_id=gw_id, batch=header.seq)
                return
        gw = self.gateways.setdefault(gw_id, _Gateway())
        old = gw.batches.get(header.seq)
        if old is not None:
            if old.header != header:
                self._report("tampered", f"two different signed batches with seq {header.seq} "
                             "(forked chain)", gateway_id=gw_id, batch=header.seq)
            return  # a copy (shared + direct subscription, redelivery)
        b = _Batch(header, ids, {m: i for i, m in enumerate(ids)}, leaf_list, self.clock())
        gw.batches[header.seq] = b
        self.counts["batches"] += 1
        self._remember("batch", payload, gw_id, header.seq)
        for m in ids:
            gw.owner[m] = header.seq
        if self._overdue:
            self._overdue.difference_update(ids)  # their batch came: judged as usual again
        if leaf_list is None:
            for m in ids:
                cands = self._waiting.get(m)
                if cands and self._by_session(cands[0][0], cands[0][1], m, b):
                    del self._waiting[m]
            self._try_whole(b)
            return
        for m in ids:
            for topic, data, _t in self._waiting.pop(m, ()):
                self._try(topic, data, m, b)

    def _check_chain(self, gw_id: str, gw: _Gateway, now: float) -> None:
        seqs = sorted(gw.batches)
        if gw.low is None:
            gw.low = self.chain_start if self.chain_start is not None else seqs[0]
        prev: _Batch | None = None
        expect = gw.low
        for s in seqs:
            if s < gw.low:
                continue
            b = gw.batches[s]
            if gw.checked_to is not None and s <= gw.checked_to:
                prev, expect = b, s + 1
                continue
            if s != expect:
                if now - b.arrived < (self.batch_timeout or self.grace):
                    return  # the missing ones may still come (class 0 drains newest first,
                    # a restarted consumer or gateway sends late)
                if self.judges is None or self.judges(gw_id):
                    self._report("missing-batch", f"batches {expect}..{s - 1} never arrived",
                                 gateway_id=gw_id, batch=expect)
            elif prev is not None and b.header.prev_root != prev.header.root:
                self._report("chain-broken", f"batch {s} does not link to batch {s - 1}",
                             gateway_id=gw_id, batch=s)
            gw.checked_to, prev, expect = s, b, s + 1

    # -- messages ----------------------------------------------------------------------

    def _owner_any(self, mid: str) -> dict[str, int]:
        gw = self.gateways.get(_gw(mid))
        return gw.owner if gw is not None else {}

    def _message(self, topic: str, payload: bytes, mid: str) -> None:
        if mid in self.delivered or self.seen(mid):
            self.counts["duplicates"] = self.counts.get("duplicates", 0) + 1
            return
        self._arrived.add(mid)
        gw = self.gateways.get(_gw(mid))
        seq = gw.owner.get(mid) if gw is not None else None
        if gw is None or seq is None:
            self._waiting.setdefault(mid, []).append((topic, payload, self.clock()))
            return
        b = gw.batches[seq]
        if b.leaves is not None:
            self._try(topic, payload, mid, b)
        elif not self._by_session(topic, payload, mid, b):
            self._waiting.setdefault(mid, []).append((topic, payload, self.clock()))
            self._try_whole(b)

    def _by_session(self, topic: str, payload: bytes, mid: str, b: _Batch) -> bool:
        """A batch without leaves: an envelope of a gateway-signed session verifies on its own
        (its AEAD authenticates it, the signed batch lists its id). False if it is not one."""
        sid = _sid_of(payload)
        if sid is None or not self.opener.knows_signed(sid):
            return False
        if mid in self.delivered:
            self.counts["duplicates"] = self.counts.get("duplicates", 0) + 1
            return True
        if self._accept(topic, payload, mid, b, signed_only=True, proof="session"):
            b.leaf_of[mid] = fast_leaf(mid, topic, payload)
        return True

    def _try(self, topic: str, payload: bytes, mid: str, b: _Batch) -> None:
        assert b.leaves is not None
        if mid in self.delivered:
            self.counts["duplicates"] = self.counts.get("duplicates", 0) + 1
            return
        if fast_leaf(mid, topic, payload) != b.leaves[b.index[mid]]:
            self._report("tampered", f"topic or payload does not match the signed leaf "
                         f"({len(payload)} B on {topic!r})", mid, b.header.gateway_id,
                         b.header.seq)
            return
        self._accept(topic, payload, mid, b, proof="leaf")

    def _try_whole(self, b: _Batch) -> None:
        """No leaves: the messages not verified by their session verify once every one has
        arrived (all or nothing: the batch's leaves must hash to the signed root)."""
        rest = [m for m in b.ids if m not in b.done]
        if not rest or not all(m in self._waiting for m in rest):
            return
        if len(b.leaf_of) < len(b.ids) - len(rest):
            return  # some were reported tampered: the root cannot be checked
        picks = {m: self._waiting[m][0] for m in rest}
        leaves = [b.leaf_of[m] if m in b.leaf_of else fast_leaf(m, picks[m][0], picks[m][1])
                  for m in b.ids]
        for m in picks:
            del self._waiting[m]
        if MerkleTree(leaves).root != b.header.root:
            for m in picks:
                self._report("tampered", "batch messages do not hash to the signed root",
                             m, b.header.gateway_id, b.header.seq)
            b.done.update(picks)
            return
        for m, (topic, payload, _t) in picks.items():
            self._accept(topic, payload, m, b, proof="root")

    def _accept(self, topic: str, payload: bytes, mid: str, b: _Batch,
                signed_only: bool = False, proof: str = "") -> bool:
        """Decrypt (if sealed) and emit: the bytes are the ones the gateway signed, or with
        ``signed_only`` their AEAD proves it (a session the gateway signed). True if emitted."""
        gw_id = b.header.gateway_id
        encrypted = False
        try:
            sid = _sid_of(payload)
            if sid is not None:
                if not self.opener.knows(sid):
                    self._no_session[mid] = (topic, payload, b, self.clock())
                    self._proof[mid] = proof
                    return False
                opened = self.opener.open(payload, topic=topic, message_id=mid,
                                          signed_only=signed_only)
                if opened.gateway_id != gw_id:
                    raise TamperedError(f"sealed in a session of gateway {opened.gateway_id!r}"
                                        f", listed by {gw_id!r}")
                payload, encrypted = opened.plaintext, True
            device = is_device_envelope(payload)
            if device:
                local = _local_topic(self.prefix, gw_id, topic)
                payload = open_device_message(
                    self.recipients, payload, device_context("", local)
                )
        except ReplayError as exc:
            self._report("replay", str(exc), mid, gw_id, b.header.seq)
            return False
        except WrongRecipientError as exc:
            self._report("wrong-key", str(exc), mid, gw_id, b.header.seq)
            return False
        except (TamperedError, CryptoError) as exc:
            self._report("tampered", str(exc), mid, gw_id, b.header.seq)
            if signed_only:
                b.done.add(mid)  # reported: the batch's root can no longer be checked
            return False
        b.done.add(mid)
        self.delivered.add(mid)
        self.counts["verified"] += 1
        proof = proof or self._proof.pop(mid, "") or ("leaf" if b.leaves is not None else "root")
        self._out.append(Verified(mid, gw_id, topic, payload, b.header.seq, encrypted, device,
                                  proof))
        return True

    def _report(self, kind: str, detail: str, message_id: str | None = None,
                gateway_id: str | None = None, batch: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._reports.append(Report(kind, detail, message_id, gateway_id, batch))


def carried_id(user_property: str | None, payload: bytes) -> tuple[str | None, bytes]:
    """(message id, protected payload) of a received message, whichever carrier it came in:
    the ``rmq-id`` user property (MQTT 5, payload as is), else the id frame (MQTT 3.1.1,
    unwrapped), else (None, payload). Raises :class:`IdFrameError` for a malformed frame."""
    if user_property:
        return user_property, payload
    if is_id_frame(payload):
        return decode_id_frame(payload)
    return None, payload


def _gw(mid: str) -> str:
    return mid.rsplit(":", 1)[0]


def _sid_of(payload: bytes) -> bytes | None:
    """Session id if ``payload`` is a gateway session envelope, else None."""
    if not payload.startswith(b"\x83\x40\xa2\x04\x48"):
        return None
    try:
        return parse_envelope(payload)[0]
    except MalformedError:
        return None


def sid_of_message(payload: bytes) -> bytes | None:
    """Session id of a gateway session envelope (None: not one)."""
    return _sid_of(payload)


def sid_of_header(payload: bytes) -> bytes | None:
    """Session id a (gateway-signed) session header announces, *not verified* (to pick the
    stored headers a restarted consumer needs; they are verified when added). None: malformed."""
    try:
        if is_signed_session(payload):
            payload = cose.parse_sign1_ml_dsa_65(payload, "signed session", KID_SIZE)[2]
        return parse_session_header(payload)[0].session_id
    except (CryptoError, ValueError, TypeError, IndexError, KeyError):
        return None


def _local_topic(prefix: str, gateway_id: str, topic: str) -> str:
    p = prefix.replace("{gateway_id}", gateway_id)
    return topic[len(p):] if topic.startswith(p) else topic
