"""Session envelopes (Sealer/Opener) and device single-shot HPKE: round trips and every attack."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapidmq_edge.crypto.e2e import (
    device_context,
    is_device_envelope,
    open_device_message,
    seal_for_recipient,
)
from rapidmq_edge.crypto.envelope import Opener, Sealer, SessionKeys, parse_session_header
from rapidmq_edge.crypto.errors import (
    CryptoError,
    MalformedError,
    ReplayError,
    TamperedError,
    UnknownSessionError,
    WrongRecipientError,
)
from rapidmq_edge.crypto.keys import RecipientKey, RecipientKeyring

GW = "gw-1"
RECIPIENT = RecipientKey(bytes(range(32)))
OTHER = RecipientKey(bytes(range(1, 33)))


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def pair(**kw: object) -> tuple[Sealer, Opener]:
    return Sealer(RECIPIENT.public(), GW, **kw), Opener(RecipientKeyring([RECIPIENT]))  # type: ignore[arg-type]


def flips(data: bytes):  # every single-bit flip
    for i in range(len(data)):
        for bit in range(8):
            b = bytearray(data)
            b[i] ^= 1 << bit
            yield bytes(b)


def test_round_trip_and_overhead() -> None:
    sealer, opener = pair()
    for i in range(50):
        payload = bytes([i]) * 256
        m = sealer.seal(payload, topic="t/a", message_id=f"{GW}:{i}")
        assert m.seq == i and m.new_session == (i == 0)
        assert payload not in m.envelope
        assert len(m.envelope) - len(payload) <= 40  # ~35 B: OSCORE-like framing + 16 B tag
        got = opener.open(
            m.envelope, topic="t/a", message_id=f"{GW}:{i}", session_header=m.session_header
        )
        assert got.plaintext == payload and got.seq == i and got.gateway_id == GW
    assert sealer.sessions_started == 1


SHARED = pair()


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(max_size=300), topic=st.text(max_size=30), mid=st.text(max_size=20))
def test_round_trip_any_input(payload: bytes, topic: str, mid: str) -> None:
    sealer, opener = SHARED
    m = sealer.seal(payload, topic=topic, message_id=mid)
    assert (
        opener.open(
            m.envelope, topic=topic, message_id=mid, session_header=m.session_header
        ).plaintext
        == payload
    )


def test_every_bit_flip_and_truncation_of_an_envelope_is_detected() -> None:
    sealer, opener = pair()
    m = sealer.seal(b"temperature=21.5", topic="t", message_id=f"{GW}:7")
    opener.add_session(m.session_header)
    n = 0
    for bad in flips(m.envelope):
        with pytest.raises((TamperedError, UnknownSessionError)):
            opener.open(bad, topic="t", message_id=f"{GW}:7")
        n += 1
    for cut in range(len(m.envelope)):
        with pytest.raises(MalformedError):
            opener.open(m.envelope[:cut], topic="t", message_id=f"{GW}:7")
    with pytest.raises(MalformedError):
        opener.open(m.envelope + b"\x00", topic="t", message_id=f"{GW}:7")
    assert n == 8 * len(m.envelope)
    # none of that consumed the sequence number: the genuine envelope still opens once
    assert opener.open(m.envelope, topic="t", message_id=f"{GW}:7").plaintext == b"temperature=21.5"


def test_every_bit_flip_of_a_session_header_is_detected() -> None:
    sealer, _ = pair()
    header = sealer.session_header
    for bad in flips(header):
        opener = Opener(RecipientKeyring([RECIPIENT]))
        with pytest.raises(CryptoError):
            opener.add_session(bad)
    for cut in range(0, len(header), 7):
        with pytest.raises(MalformedError):
            Opener(RecipientKeyring([RECIPIENT])).add_session(header[:cut])


@pytest.mark.parametrize("field", ["topic", "message_id", "gateway"])
def test_metadata_is_bound(field: str) -> None:
    sealer, opener = pair()
    m = sealer.seal(b"x", topic="a/b", message_id=f"{GW}:1")
    opener.add_session(m.session_header)
    if field == "gateway":
        # a header from another gateway id, same session secret cannot be forged: other sealer
        other = Sealer(RECIPIENT.public(), "gw-2")
        m2 = other.seal(b"x", topic="a/b", message_id=f"{GW}:1")
        opener.add_session(m2.session_header)
        assert opener.open(m2.envelope, topic="a/b", message_id=f"{GW}:1").gateway_id == "gw-2"
        return
    kw = {"topic": "a/b", "message_id": f"{GW}:1"}
    kw[field] = kw[field] + "x"
    with pytest.raises(TamperedError):
        opener.open(m.envelope, **kw)


def test_replay_duplicate_reorder_and_window() -> None:
    sealer, _ = pair()
    opener = Opener(RecipientKeyring([RECIPIENT]), replay_window=8)
    msgs = [sealer.seal(b"%d" % i, topic="t", message_id=str(i)) for i in range(20)]
    opener.add_session(msgs[0].session_header)
    order = [0, 2, 1, 5, 3, 4]  # reordering inside the window is accepted
    for i in order:
        assert opener.open(msgs[i].envelope, topic="t", message_id=str(i)).seq == i
    for i in order:  # every duplicate is refused
        with pytest.raises(ReplayError, match="already accepted"):
            opener.open(msgs[i].envelope, topic="t", message_id=str(i))
    opener.open(msgs[19].envelope, topic="t", message_id="19")
    with pytest.raises(ReplayError, match="older than the replay window"):
        opener.open(msgs[6].envelope, topic="t", message_id="6")
    assert opener.open(msgs[12].envelope, topic="t", message_id="12").seq == 12  # inside window


def test_unknown_session_and_wrong_recipient() -> None:
    sealer, opener = pair()
    m = sealer.seal(b"x", topic="t", message_id="1")
    with pytest.raises(UnknownSessionError):
        opener.open(m.envelope, topic="t", message_id="1")
    stranger = Opener(RecipientKeyring([OTHER]))
    with pytest.raises(WrongRecipientError, match="does not hold"):
        stranger.add_session(m.session_header)
    # a keyring holding a key with the right kid is required; an impostor key under that kid fails
    info = parse_session_header(m.session_header)[0]
    assert info.recipient_kid == RECIPIENT.kid and info.gateway_id == GW


def test_forged_header_reusing_a_session_id_does_not_break_the_real_session() -> None:
    sealer, opener = pair(randbytes=lambda n: b"\x01" * n)
    evil = Sealer(
        RECIPIENT.public(), GW, randbytes=lambda n: (b"\x01" * 8)[:n] if n == 8 else b"\x02" * n
    )
    real = sealer.seal(b"real", topic="t", message_id="1")
    forged = evil.seal(b"forged", topic="t", message_id="1")
    assert real.session_id == forged.session_id
    opener.add_session(forged.session_header)
    opener.add_session(real.session_header)
    assert opener.open(real.envelope, topic="t", message_id="1").plaintext == b"real"


def test_renewal_by_count_and_by_time() -> None:
    clock = Clock()
    sealer, opener = pair(max_messages=3, max_age=60.0, clock=clock)
    sids = []
    for i in range(7):
        m = sealer.seal(b"x", topic="t", message_id=str(i))
        sids.append(m.session_id)
        assert opener.open(
            m.envelope, topic="t", message_id=str(i), session_header=m.session_header
        )
    assert len(set(sids)) == 3 and sealer.sessions_started == 3  # 3 + 3 + 1
    clock.now += 59
    assert sealer.seal(b"x", topic="t", message_id="7").session_id == sids[-1]
    clock.now += 1
    m = sealer.seal(b"x", topic="t", message_id="8")
    assert m.new_session and m.session_id != sids[-1] and m.seq == 0
    assert parse_session_header(m.session_header)[0].created == int(clock.now)


def test_recipient_rotation_mid_stream() -> None:
    new = RecipientKey(bytes(range(2, 34)))
    sealer = Sealer(RECIPIENT.public(), GW)
    old_msgs = [sealer.seal(b"old%d" % i, topic="t", message_id=str(i)) for i in range(3)]
    sealer.set_recipient(new.public())
    new_msgs = [sealer.seal(b"new%d" % i, topic="t", message_id=str(10 + i)) for i in range(3)]
    assert new_msgs[0].new_session and new_msgs[0].session_id != old_msgs[0].session_id
    # the cloud keeps the retired key in its keyring: both sessions open, in any order
    opener = Opener(RecipientKeyring([new, RECIPIENT]))
    for i, m in reversed(list(enumerate(new_msgs))):
        assert (
            opener.open(
                m.envelope, topic="t", message_id=str(10 + i), session_header=m.session_header
            ).plaintext
            == b"new%d" % i
        )
    for i, m in enumerate(old_msgs):
        assert (
            opener.open(
                m.envelope, topic="t", message_id=str(i), session_header=m.session_header
            ).plaintext
            == b"old%d" % i
        )
    # without the retired key the old session is refused, precisely
    with pytest.raises(WrongRecipientError):
        Opener(RecipientKeyring([new])).add_session(old_msgs[0].session_header)


def test_nonces_are_unique_and_follow_oscore() -> None:
    keys = SessionKeys.derive(b"\x00" * 32, b"\x01" * 8)
    nonces = {keys.nonce(s) for s in range(5000)}
    assert len(nonces) == 5000
    assert (
        bytes(a ^ b for a, b in zip(keys.nonce(5), keys.common_iv, strict=True))
        == bytes(11) + b"\x05"
    )


def test_device_single_shot_hpke() -> None:
    ctx = device_context("sensor-7", "plant/temp")
    data = seal_for_recipient(RECIPIENT.public(), b"secret reading", ctx)
    assert is_device_envelope(data) and not is_device_envelope(b"\xa0")
    ring = RecipientKeyring([RECIPIENT])
    assert open_device_message(ring, data, ctx) == b"secret reading"
    assert len(data) - len(b"secret reading") < 1170
    with pytest.raises(TamperedError):
        open_device_message(ring, data, device_context("sensor-8", "plant/temp"))
    with pytest.raises(WrongRecipientError):
        open_device_message(RecipientKeyring([OTHER]), data, ctx)
    for i in range(0, len(data) * 8, 13):  # a spread of bit flips over every region
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CryptoError):
            open_device_message(ring, bytes(b), ctx)
    with pytest.raises(MalformedError):
        open_device_message(ring, data[:-1], ctx)


@settings(max_examples=50, deadline=None)
@given(
    sid=st.binary(min_size=8, max_size=8),
    seq=st.integers(0, 2**40 - 1),
    ct=st.binary(max_size=70000),
    topic=st.text(max_size=40),
)
def test_fast_encoders_equal_cbor2(sid: bytes, seq: int, ct: bytes, topic: str) -> None:
    from rapidmq_edge.crypto import cose
    from rapidmq_edge.crypto.envelope import (
        _bstr_head,
        _piv,
        _piv_bstr,
        encode_envelope,
        message_aad,
    )

    piv = _piv(seq)
    assert encode_envelope(sid, piv, ct) == cose.dumps([b"", {4: sid, 6: piv}, ct])
    assert _piv_bstr(seq) == cose.dumps(piv)
    assert _bstr_head(len(ct)) + ct == cose.dumps(ct)
    ext = cose.dumps([1, 3, sid, piv, topic, "gw", "gw:1"])
    assert message_aad(sid, piv, topic, "gw", "gw:1") == cose.enc_structure(b"", ext)
    keys = SessionKeys.derive(sid * 4, sid)
    padded = bytes(7) + seq.to_bytes(5, "big")
    assert keys.nonce(seq) == bytes(a ^ b for a, b in zip(padded, keys.common_iv, strict=True))


@pytest.mark.parametrize("topic", ["t/1", "x/" * 150])  # AAD shorter / longer than 255 bytes
def test_seal_parts_is_byte_identical_to_the_generic_composition(topic: str) -> None:
    """The gateway's fused seal (one join per AAD and envelope, per-topic AAD part) produces
    exactly encode_envelope(AES-GCM(message_aad(...))) for 1-, 2- and 3-byte Partial IVs."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from rapidmq_edge.crypto.envelope import _piv, encode_envelope, message_aad, tstr

    sealer = Sealer(RecipientKey.generate().public(), "gw-7", max_messages=1 << 20)
    sealer.session_header  # noqa: B018 - start the session
    keys = sealer._keys
    assert keys is not None
    for seq in (0, 255, 256, 65535, 65536):
        sealer._seq = seq
        mid = f"gw-7:{seq}"
        got = sealer.seal_parts(b"payload %d" % seq, sealer.topic_gw_tstr(topic), tstr(mid))
        piv = _piv(seq)
        ct = AESGCM(keys.key).encrypt(
            keys.nonce(seq), b"payload %d" % seq,
            message_aad(keys.session_id, piv, topic, "gw-7", mid),
        )
        assert got == encode_envelope(keys.session_id, piv, ct)
