"""Per-message encryption for forwarded messages: an HPKE-established session + OSCORE-style AEAD.

Sans-I/O. :class:`Sealer` (gateway) turns plaintexts into envelopes; :class:`Opener` (cloud)
turns them back, rejecting tampering, replays and unknown sessions with distinct errors.

Constructions followed (see docs/crypto.md for the wire formats and test vectors):

* **Session header** = COSE_Encrypt0 (tag 16) whose ciphertext is a fresh 32-byte master secret
  sealed with HPKE-9 (X-Wing, SHAKE256, AES-256-GCM; RFC 9180 base mode) to the cloud recipient.
  Protected header ``{1: 56, 4: recipient kid, "sid": session id, "gw": gateway id,
  "iat": unix time}``; unprotected ``{-4: enc}`` ("ek", draft-ietf-cose-hpke). HPKE info = the
  COSE Enc_structure of that protected header, so all of it is bound to the secret.
* **Per-message key and nonce** as OSCORE (RFC 8613 §3.2, §5.2): ``key = HKDF-SHA256(salt="",
  IKM=master secret, info=[h'', sid, 3, "Key", 32])``, ``common IV = HKDF(.., [h'', sid, 3, "IV",
  12])``, ``nonce = (0x00 || 0^6 || seq as 5 bytes) XOR common IV``.
* **Message** = COSE_Encrypt0 (untagged) ``[h'', {4: sid, 6: partial IV}, ciphertext]`` with
  AES-256-GCM; ``external_aad = [1, 3, sid, partial IV, topic, gateway id, message id]``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import accel, cose
from .errors import (
    MalformedError,
    ReplayError,
    TamperedError,
    UnknownSessionError,
    WrongRecipientError,
)
from .hpke_suite import hpke_open, hpke_seal
from .keys import KID_SIZE, RecipientKeyring, RecipientPublicKey

__all__ = [
    "MAX_SEQ",
    "SESSION_ID_SIZE",
    "OpenedMessage",
    "Opener",
    "SealedMessage",
    "Sealer",
    "SessionInfo",
    "SessionKeys",
    "encode_envelope",
    "message_aad",
    "parse_session_header",
    "tstr",
]

SESSION_ID_SIZE = 8
MASTER_SECRET_SIZE = 32
NONCE_SIZE = 12
MAX_SEQ = 2**40 - 1  # OSCORE: Partial IV is at most 5 bytes
AAD_VERSION = 1


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _piv(seq: int) -> bytes:
    """Partial IV: the sequence number in the fewest big-endian bytes (0 -> h'00')."""
    return seq.to_bytes(max(1, (seq.bit_length() + 7) // 8), "big")


def _bstr(data: bytes) -> bytes:
    """CBOR byte string (major type 2) — same bytes as ``cbor2.dumps(data)``, faster."""
    n = len(data)
    if n < 24:
        return bytes((0x40 + n,)) + data
    if n < 256:
        return bytes((0x58, n)) + data
    if n < 65536:
        return b"\x59" + n.to_bytes(2, "big") + data
    return bytes(cbor2.dumps(data))


def tstr(text: str) -> bytes:
    """CBOR text string (major type 3) — same bytes as ``cbor2.dumps(text)``, faster."""
    data = text.encode()
    n = len(data)
    if n < 24:
        return bytes((0x60 + n,)) + data
    if n < 256:
        return bytes((0x78, n)) + data
    if n < 65536:
        return b"\x79" + n.to_bytes(2, "big") + data
    return bytes(cbor2.dumps(text))


# CBOR heads of fixed shape (tests compare with cose.enc_structure / cbor2 encodings):
_ENC0_PREFIX = b"\x83\x68Encrypt0\x40"  # ["Encrypt0", h'', ...
_ENV_PREFIX = b"\x83\x40\xa2\x04\x48"  # [h'', {4: <8-byte bstr>...
_EXT_HEAD = bytes((0x87, AAD_VERSION, 3, 0x48))  # [1, 3 (A256GCM), <8-byte sid>...
#: CBOR byte-string heads for lengths 0..255
_BSTR_HEADS = [bytes((0x40 + n,)) if n < 24 else bytes((0x58, n)) for n in range(256)]
#: Partial IV as a CBOR byte string, for seq < 256 (the first 256 messages of a session)
_PIV_BSTR = [bytes((0x41, i)) for i in range(256)]


#: Enc_structure head up to external_aad's byte-string head, for external_aad lengths 0..255
_AAD_HEADS = [_ENC0_PREFIX + h for h in _BSTR_HEADS]
#: external_aad length before its variable part: [1, 3, <8-byte sid>
_EXT_HEAD_LEN = len(_EXT_HEAD) + SESSION_ID_SIZE


def _piv_bstr(seq: int) -> bytes:
    """Partial IV of ``seq`` as a CBOR byte string (head and value in one integer)."""
    if seq < 256:
        return _PIV_BSTR[seq]
    n = (seq.bit_length() + 7) >> 3
    return ((0x40 + n) << (n << 3) | seq).to_bytes(n + 1, "big")


def _bstr_head(n: int) -> bytes:
    """CBOR byte-string head for a length of ``n`` bytes."""
    if n < 256:
        return _BSTR_HEADS[n]
    if n < 65536:
        return b"\x59" + n.to_bytes(2, "big")
    return b"\x5a" + n.to_bytes(4, "big") if n < 1 << 32 else b"\x5b" + n.to_bytes(8, "big")


def message_aad(
    session_id: bytes, piv: bytes, topic: str, gateway_id: str, message_id: str
) -> bytes:
    """The AEAD additional data: Enc_structure ["Encrypt0", h'', external_aad]."""
    external = cbor2.dumps(
        [AAD_VERSION, cose.ALG_A256GCM, session_id, piv, topic, gateway_id, message_id]
    )
    return _ENC0_PREFIX + _bstr(external)


def encode_envelope(session_id: bytes, piv: bytes, ciphertext: bytes) -> bytes:
    """``[h'', {4: session_id, 6: piv}, ciphertext]`` (deterministic CBOR)."""
    return _ENV_PREFIX + session_id + b"\x06" + _bstr(piv) + _bstr(ciphertext)


@dataclass(frozen=True)
class SessionKeys:
    """The OSCORE-style security context derived from a session's master secret."""

    session_id: bytes
    key: bytes
    common_iv: bytes

    @classmethod
    def derive(cls, master_secret: bytes, session_id: bytes) -> SessionKeys:
        """RFC 8613 §3.2.1 derivation with empty sender id, id context = session id."""

        def info(kind: str, length: int) -> bytes:
            return cose.dumps([b"", session_id, cose.ALG_A256GCM, kind, length])

        return cls(
            session_id,
            _hkdf(master_secret, info("Key", 32), 32),
            _hkdf(master_secret, info("IV", NONCE_SIZE), NONCE_SIZE),
        )

    def nonce(self, seq: int) -> bytes:
        """RFC 8613 §5.2 nonce for sequence number ``seq`` (empty sender id)."""
        return (int.from_bytes(self.common_iv, "big") ^ seq).to_bytes(NONCE_SIZE, "big")


@dataclass(frozen=True)
class SessionInfo:
    """What a session header says (authenticated by the HPKE decryption)."""

    session_id: bytes
    gateway_id: str
    recipient_kid: bytes
    created: int


@dataclass(frozen=True)
class SealedMessage:
    """Output of :meth:`Sealer.seal`."""

    envelope: bytes
    session_id: bytes
    seq: int
    session_header: bytes  # header of the session this envelope belongs to
    new_session: bool  # True for the first envelope of a session: deliver the header first


@dataclass(frozen=True)
class OpenedMessage:
    """Output of :meth:`Opener.open`."""

    plaintext: bytes
    session_id: bytes
    seq: int
    gateway_id: str
    signer: bytes | None = None  # kid that signed the session header, if it was signed


# ----------------------------------------------------------------------------- session header


def _header_protected(info: SessionInfo) -> bytes:
    return cose.dumps(
        {
            cose.HDR_ALG: cose.ALG_HPKE_9,
            cose.HDR_KID: info.recipient_kid,
            "sid": info.session_id,
            "gw": info.gateway_id,
            "iat": info.created,
        }
    )


def build_session_header(
    recipient: RecipientPublicKey, info: SessionInfo, master_secret: bytes
) -> bytes:
    """Seal ``master_secret`` to ``recipient`` as a session header (COSE_Encrypt0, tag 16)."""
    protected = _header_protected(info)
    enc, ct = hpke_seal(
        recipient.hpke_public_key, master_secret, cose.enc_structure(protected, b"")
    )
    return cose.dumps(cbor2.CBORTag(cose.TAG_COSE_ENCRYPT0, [protected, {cose.HDR_EK: enc}, ct]))


def parse_session_header(data: bytes) -> tuple[SessionInfo, bytes, bytes, bytes]:
    """Parse (without decrypting) a session header: ``(info, protected, enc, ciphertext)``."""
    arr = cose.as_array(
        cose.untag(cose.decode_strict(data, "session header"), 16, "session header"),
        3,
        "session header",
    )
    protected = cose.as_bytes(arr[0], "session header protected")
    hdr = cose.as_map(cose.decode_strict(protected, "session header protected"), "protected")
    unprot = cose.as_map(arr[1], "session header unprotected")
    if hdr.get(cose.HDR_ALG) != cose.ALG_HPKE_9:
        raise MalformedError(
            f"session header: alg {cose.show(hdr.get(cose.HDR_ALG))} is not HPKE-9")
    gw, iat = hdr.get("gw"), hdr.get("iat")
    if not isinstance(gw, str) or not isinstance(iat, int):
        raise MalformedError("session header: gw must be text and iat an integer")
    info = SessionInfo(
        session_id=cose.as_bytes(hdr.get("sid"), "session id", SESSION_ID_SIZE),
        gateway_id=gw,
        recipient_kid=cose.as_bytes(hdr.get(cose.HDR_KID), "recipient kid", KID_SIZE),
        created=iat,
    )
    enc = cose.as_bytes(unprot.get(cose.HDR_EK), "session header ek")
    return info, protected, enc, cose.as_bytes(arr[2], "session header ciphertext")


# ----------------------------------------------------------------------------- Sealer


class Sealer:
    """Gateway side: seals messages under a session to one cloud recipient; renews sessions.

    A new session starts on first use, after ``max_messages`` envelopes, once ``max_age`` seconds
    have passed (``clock`` is injectable), on :meth:`rekey` and after :meth:`set_recipient`.
    State is in memory only: a restarted gateway always starts a new session, so a
    (key, nonce) pair is never reused.
    """

    def __init__(
        self,
        recipient: RecipientPublicKey,
        gateway_id: str,
        *,
        max_messages: int = 1 << 20,
        max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not 1 <= max_messages <= MAX_SEQ + 1:
            raise ValueError(f"max_messages must be in 1..{MAX_SEQ + 1}")
        self.recipient = recipient
        self.gateway_id = gateway_id
        self.max_messages = max_messages
        self.max_age = max_age
        self._clock = clock
        self._rand = randbytes
        self._keys: SessionKeys | None = None
        self._aead: AESGCM | None = None
        self._fast: Any = None  # accel GcmSealer of the session key, when built
        self._header = b""
        self._gw_t = tstr(gateway_id)
        self._civ = 0  # common IV as an integer (nonce = civ XOR seq)
        self._ext_head = b""  # external_aad head up to the session id
        self._env_head = b""  # envelope head up to the Partial IV label
        self._topics: dict[str, bytes] = {}  # topic -> CBOR text string (bounded)
        self._created = 0.0
        self._seq = 0
        self.sessions_started = 0

    def _new_session(self) -> None:
        created = self._clock()
        info = SessionInfo(
            session_id=self._rand(SESSION_ID_SIZE),
            gateway_id=self.gateway_id,
            recipient_kid=self.recipient.kid,
            created=int(created),
        )
        secret = self._rand(MASTER_SECRET_SIZE)
        self._header = build_session_header(self.recipient, info, secret)
        self._keys = SessionKeys.derive(secret, info.session_id)
        self._aead = AESGCM(self._keys.key)
        self._civ = int.from_bytes(self._keys.common_iv, "big")
        self._ext_head = _EXT_HEAD + info.session_id
        self._env_head = _ENV_PREFIX + info.session_id + b"\x06"
        self._fast = (
            accel.FASTPATH.GcmSealer(
                self._keys.key, self._keys.common_iv, self._ext_head, self._env_head)
            if accel.FASTPATH is not None else None
        )
        self._created = created
        self._seq = 0
        self.sessions_started += 1

    def _needs_session(self) -> bool:
        return (
            self._keys is None
            or self._seq >= self.max_messages
            or self._clock() - self._created >= self.max_age
        )

    @property
    def session_header(self) -> bytes:
        """The current session's header (starts a session if none is live)."""
        if self._needs_session():
            self._new_session()
        return self._header

    @property
    def session_id(self) -> bytes:
        """The current session id."""
        self.session_header  # noqa: B018 - ensures a live session
        assert self._keys is not None
        return self._keys.session_id

    def rekey(self) -> bytes:
        """Start a new session now; returns its header."""
        self._new_session()
        return self._header

    def set_recipient(self, recipient: RecipientPublicKey) -> None:
        """Seal to another recipient key (rotation); the next seal starts a new session."""
        self.recipient = recipient
        self._keys = None

    @property
    def header(self) -> bytes:
        """The header of the session the last envelope belongs to (no side effect)."""
        return self._header

    def topic_tstr(self, topic: str) -> bytes:
        """``topic`` as a CBOR text string, cached (devices reuse their topics)."""
        t = self._topics.get(topic)
        if t is None:
            if len(self._topics) >= 4096:
                self._topics.clear()
            t = self._topics[topic] = tstr(topic)
        return t

    def seal_raw(self, plaintext: bytes, topic_t: bytes, message_id_t: bytes) -> bytes:
        """Fast path of :meth:`seal`: returns only the envelope (same bytes).

        ``topic_t`` / ``message_id_t`` are CBOR text strings (:func:`tstr`,
        :meth:`topic_tstr`). Renews the session when due; compare :attr:`header` before and
        after to see whether a new session header must be delivered first.
        """
        return self.seal_parts(plaintext, topic_t + self._gw_t, message_id_t)

    def seal_parts(self, plaintext: bytes, topic_gw_t: bytes, message_id_t: bytes) -> bytes:
        """:meth:`seal_raw` with ``topic_gw_t`` = CBOR topic || CBOR gateway id (cacheable per
        topic, :meth:`topic_gw_tstr`)."""
        return self.seal_leaf(plaintext, topic_gw_t, message_id_t, None)[0]

    def seal_leaf(
        self, plaintext: bytes, topic_gw_t: bytes, message_id_t: bytes,
        leaf_prefix: bytes | None,
    ) -> tuple[bytes, bytes | None]:
        """:meth:`seal_parts` and, with ``leaf_prefix``, the leaf hash of the envelope:
        ``SHA-256(leaf_prefix || SHA-256(envelope))`` (:func:`accel.leaf`), in one call to the
        C accelerator when it is built."""
        seq = self._seq
        if (
            self._keys is None or seq >= self.max_messages
            or self._clock() - self._created >= self.max_age
        ):
            self._new_session()
            seq = 0
        self._seq = seq + 1
        if self._fast is not None:  # the same bytes, built in C (crypto/_fastpath.c)
            return self._fast.seal(  # type: ignore[no-any-return]
                seq, plaintext, topic_gw_t, message_id_t, leaf_prefix)
        piv_b = (
            _PIV_BSTR[seq] if seq < 256
            else (0x420000 | seq).to_bytes(3, "big") if seq < 65536 else _piv_bstr(seq)
        )
        n = _EXT_HEAD_LEN + len(piv_b) + len(topic_gw_t) + len(message_id_t)
        nonce = (self._civ ^ seq).to_bytes(NONCE_SIZE, "big")
        aad = b"".join((
            _AAD_HEADS[n] if n < 256 else _ENC0_PREFIX + _bstr_head(n),
            self._ext_head, piv_b, topic_gw_t, message_id_t,
        ))
        n = len(plaintext) + 16  # ciphertext || tag
        head = b"".join((
            self._env_head, piv_b,
            _BSTR_HEADS[n] if n < 256 else (0x590000 | n).to_bytes(3, "big") if n < 65536
            else _bstr_head(n),
        ))
        envelope = head + self._aead.encrypt(nonce, plaintext, aad)  # type: ignore[union-attr]
        return envelope, None if leaf_prefix is None else accel.leaf(leaf_prefix, envelope)

    def topic_gw_tstr(self, topic: str) -> bytes:
        """CBOR ``topic`` followed by CBOR gateway id (the AAD part fixed per topic)."""
        return self.topic_tstr(topic) + self._gw_t

    def seal(self, plaintext: bytes, *, topic: str, message_id: str) -> SealedMessage:
        """Encrypt ``plaintext``, binding ``topic``, the gateway id and ``message_id``."""
        before = self._header
        envelope = self.seal_raw(plaintext, self.topic_tstr(topic), tstr(message_id))
        keys = self._keys
        assert keys is not None
        new = self._header is not before
        return SealedMessage(envelope, keys.session_id, self._seq - 1, self._header, new)


# ----------------------------------------------------------------------------- Opener


@dataclass
class _ReplayWindow:
    size: int
    top: int = -1
    mask: int = 0  # bit i set <=> top - i was accepted

    def check(self, seq: int) -> None:
        if seq > self.top:
            return
        if self.top - seq >= self.size:
            raise ReplayError(f"sequence number {seq} is older than the replay window")
        if self.mask >> (self.top - seq) & 1:
            raise ReplayError(f"sequence number {seq} was already accepted (replay)")

    def accept(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.mask = ((self.mask << shift) | 1) & ((1 << self.size) - 1) if self.top >= 0 else 1
            self.top = seq
        else:
            self.mask |= 1 << (self.top - seq)


@dataclass
class _Session:
    info: SessionInfo
    header: bytes
    keys: SessionKeys
    aead: Any
    window: _ReplayWindow = field(default_factory=lambda: _ReplayWindow(0))
    signer: bytes | None = None  # kid of the identity that signed the header, if any


def parse_envelope(data: bytes) -> tuple[bytes, bytes, int, bytes]:
    """Parse a per-message envelope: ``(session_id, partial_iv, seq, ciphertext)``."""
    arr = cose.as_array(cose.decode_strict(data, "envelope"), 3, "envelope")
    if arr[0] != b"":
        raise MalformedError("envelope: protected header must be empty")
    unprot = cose.as_map(arr[1], "envelope unprotected")
    sid = cose.as_bytes(unprot.get(cose.HDR_KID), "envelope kid", SESSION_ID_SIZE)
    piv = cose.as_bytes(unprot.get(cose.HDR_PARTIAL_IV), "envelope partial IV")
    if not 1 <= len(piv) <= 5 or (len(piv) > 1 and piv[0] == 0) or len(unprot) != 2:
        raise MalformedError("envelope: partial IV must be 1-5 bytes, minimal")
    ct = cose.as_bytes(arr[2], "envelope ciphertext")
    if len(ct) < 16:
        raise MalformedError("envelope: ciphertext shorter than the AEAD tag")
    return sid, piv, int.from_bytes(piv, "big"), ct


class Opener:
    """Cloud side: learns sessions from headers and opens envelopes, once each.

    ``keyring`` holds every recipient key still accepted (rotated-out keys included), so sessions
    sealed to an older key still open. Up to ``max_sessions`` sessions are kept (oldest evicted);
    each keeps an OSCORE-style replay window of ``replay_window`` sequence numbers.
    """

    def __init__(
        self, keyring: RecipientKeyring, *, replay_window: int = 4096, max_sessions: int = 4096
    ) -> None:
        if replay_window < 1 or max_sessions < 1:
            raise ValueError("replay_window and max_sessions must be positive")
        self.keyring = keyring
        self.replay_window = replay_window
        self.max_sessions = max_sessions
        # sid -> candidate sessions (normally one; a forged header reusing a sid cannot evict
        # the real one, it only adds a candidate that will never authenticate real envelopes)
        self._sessions: dict[bytes, list[_Session]] = {}

    def add_session(self, header: bytes, signer: bytes | None = None) -> SessionInfo:
        """Decrypt a session header and remember the session (idempotent).

        ``signer``: kid of the gateway identity whose signature over ``header`` the caller
        verified (:mod:`~rapidmq_edge.crypto.signed_session`); only such sessions count for
        :meth:`open` with ``signed_only``. Raises WrongRecipientError (kid not in the
        keyring), TamperedError / MalformedError.
        """
        for s in self._sessions.get(self._peek_sid(header), ()):
            if s.header == header:
                s.signer = s.signer or signer
                return s.info
        info, protected, enc, ct = parse_session_header(header)
        key = self.keyring.get(info.recipient_kid)
        if key is None:
            raise WrongRecipientError(
                f"session {info.session_id.hex()} is sealed to recipient kid "
                f"{info.recipient_kid.hex()}, which this keyring does not hold"
            )
        secret = hpke_open(key.hpke_private_key, enc, ct, cose.enc_structure(protected, b""))
        if len(secret) != MASTER_SECRET_SIZE:
            raise MalformedError("session header: master secret must be 32 bytes")
        keys = SessionKeys.derive(secret, info.session_id)
        session = _Session(
            info, bytes(header), keys, AESGCM(keys.key), _ReplayWindow(self.replay_window),
            signer,
        )
        candidates = self._sessions.setdefault(info.session_id, [])
        candidates.append(session)
        del candidates[:-4]
        while len(self._sessions) > self.max_sessions:
            del self._sessions[next(iter(self._sessions))]
        return info

    @staticmethod
    def _peek_sid(header: bytes) -> bytes:
        try:
            return parse_session_header(header)[0].session_id
        except MalformedError:
            return b""

    def knows(self, session_id: bytes) -> bool:
        """True if a header for ``session_id`` was added."""
        return session_id in self._sessions

    def knows_signed(self, session_id: bytes) -> bool:
        """True if a gateway-signed header for ``session_id`` was added."""
        return any(s.signer is not None for s in self._sessions.get(session_id, ()))

    def open(
        self,
        envelope: bytes,
        *,
        topic: str,
        message_id: str,
        session_header: bytes | None = None,
        signed_only: bool = False,
    ) -> OpenedMessage:
        """Decrypt and authenticate an envelope (and topic, message id, gateway id); once only.

        ``session_header`` may accompany the envelope; it is added first if new. With
        ``signed_only`` only sessions whose header a gateway signed are tried (an envelope of
        an unsigned session with the same id is then TamperedError). Raises
        MalformedError/TamperedError, UnknownSessionError, ReplayError, WrongRecipientError.
        """
        if session_header is not None:
            self.add_session(session_header)
        sid, piv, seq, ct = parse_envelope(envelope)
        candidates = self._sessions.get(sid)
        if not candidates:
            raise UnknownSessionError(f"no session header seen for session {sid.hex()}")
        for s in candidates:
            if signed_only and s.signer is None:
                continue
            aad = message_aad(sid, piv, topic, s.info.gateway_id, message_id)
            try:
                plaintext = s.aead.decrypt(s.keys.nonce(seq), ct, aad)
            except InvalidTag:
                continue
            s.window.check(seq)  # only after authentication: forgeries cannot move the window
            s.window.accept(seq)
            return OpenedMessage(plaintext, sid, seq, s.info.gateway_id, s.signer)
        raise TamperedError(
            f"envelope {sid.hex()}#{seq} does not authenticate (modified ciphertext, topic, "
            "message id or gateway id)"
        )
