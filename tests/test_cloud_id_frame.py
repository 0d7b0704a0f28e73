"""The message id over MQTT 3.1.1: the id frame (sans-I/O), the uplink applying it to
protected messages only, the Protector marking them, and the verifier reading both carriers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapidmq_edge.cloud.ingest import _row
from rapidmq_edge.cloud.subscriber import Delivery
from rapidmq_edge.cloud.verify import Ingest, carried_id
from rapidmq_edge.config.forwarding import ForwardRule, UpstreamSettings
from rapidmq_edge.config.security import SecuritySettings
from rapidmq_edge.crypto.keystore import KeyStore
from rapidmq_edge.mqtt.id_frame import (
    FRAME_PROPS,
    MAGIC,
    IdFrameError,
    decode_id_frame,
    encode_id_frame,
    is_id_frame,
)
from rapidmq_edge.pipeline.protect import Protector
from rapidmq_edge.store.forward_queue import ForwardQueue
from rapidmq_edge.uplink import Outgoing, UplinkClient

from .conftest import MosquittoBroker
from .test_cloud_verify import GW, _stream
from .test_uplink import UNLIMITED, MemorySource, Subscriber, run_client, subscribers, url

__all__ = ["subscribers"]  # the fixture, imported for its name

ids_st = st.text(min_size=1, max_size=80).filter(lambda s: 0 < len(s.encode()) < 0x10000)


# =========================================================================== the frame


def test_frame_layout_is_the_documented_one() -> None:
    frame = encode_id_frame(b"gw7:42", b"\x83payload")
    assert frame == b"\xffRMQ" + b"\x01" + b"\x00\x06" + b"gw7:42" + b"\x83payload"
    assert is_id_frame(frame) and not is_id_frame(b"\x83payload")
    assert decode_id_frame(frame) == ("gw7:42", b"\x83payload")


@settings(max_examples=300, deadline=None)
@given(mid=ids_st, payload=st.binary(max_size=512))
def test_round_trip(mid: str, payload: bytes) -> None:
    assert decode_id_frame(encode_id_frame(mid.encode(), payload)) == (mid, payload)
    # the payload inside is untouched even when it looks like a frame itself
    inner = encode_id_frame(b"x:1", payload)
    assert decode_id_frame(encode_id_frame(mid.encode(), inner)) == (mid, inner)


@settings(max_examples=200, deadline=None)
@given(mid=ids_st, payload=st.binary(max_size=64), data=st.data())
def test_every_truncation_of_header_or_id_is_refused_with_a_reason(
        mid: str, payload: bytes, data: st.DataObject) -> None:
    frame = encode_id_frame(mid.encode(), payload)
    cut = data.draw(st.integers(0, 7 + len(mid.encode()) - 1))
    with pytest.raises(IdFrameError, match="truncated|no id frame magic"):
        decode_id_frame(frame[:cut])


@settings(max_examples=500, deadline=None)
@given(tail=st.binary(max_size=40))
def test_garbage_after_the_magic_decodes_or_raises_only_id_frame_error(tail: bytes) -> None:
    try:
        mid, rest = decode_id_frame(MAGIC + tail)
    except IdFrameError as exc:
        assert str(exc)  # a reason, never an empty message
    else:
        assert tail[0] == 1 and mid.encode() + rest == tail[3:]


def test_malformed_frames_name_the_reason() -> None:
    cases = [
        (b"\xffRMQ\x02\x00\x01a", "unsupported id frame version 2"),
        (b"\xffRMQ\x01\x00\x00", "empty message id"),
        (b"\xffRMQ\x01\x00\x09gw:1", r"truncated message id \(4 of 9"),
        (b"\xffRMQ\x01\x00\x02\xff\xfe", "not UTF-8"),
        (b"\xffRMQ\x01", "truncated header"),
    ]
    for frame, reason in cases:
        with pytest.raises(IdFrameError, match=reason):
            decode_id_frame(frame)
    with pytest.raises(ValueError):
        encode_id_frame(b"", b"x")
    with pytest.raises(ValueError):
        encode_id_frame(b"x" * 0x10000, b"x")


def test_carriers_user_property_wins_and_frame_is_unwrapped() -> None:
    framed = encode_id_frame(b"gw:5", b"body")
    assert carried_id("gw:9", framed) == ("gw:9", framed)  # MQTT 5: payload as it came
    assert carried_id(None, framed) == ("gw:5", b"body")
    assert carried_id(None, b"body") == (None, b"body")
    with pytest.raises(IdFrameError):
        carried_id(None, MAGIC + b"\x01")
    bad = Delivery("edge/gw/s", MAGIC + b"\x07", {}, 1, 1, 1)
    assert _row(bad) == ("", "edge/gw/s", MAGIC + b"\x07")  # kept for the verifier to report


# =========================================================================== the verifier


@pytest.mark.parametrize("leaves", [True, False])
def test_ingest_verifies_framed_and_property_carried_messages_alike(leaves: bool) -> None:
    stream, ids, recs = _stream(leaves, n=8)
    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    for i, (topic, payload, mid) in enumerate(stream):
        if mid is not None and i % 2:  # half of them as a 3.1.1 upstream sends them
            ing.publish(topic, encode_id_frame(mid.encode(), payload), None)
        else:
            ing.publish(topic, payload, mid)
    out, reports = ing.finish()
    assert not reports
    assert sorted(v.payload for v in out) == sorted(b"v%d" % q for q in range(10, 18))


def test_ingest_reports_malformed_or_lying_frames_and_never_accepts_them() -> None:
    stream, ids, recs = _stream(True, n=4)
    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    msgs = [s for s in stream if s[2] is not None]
    session, batch = stream[0], stream[-1]
    ing.publish(*session)
    t0, p0, m0 = msgs[0]
    ing.publish(t0, MAGIC + b"\x01\x00\x40" + m0.encode(), None)  # truncated id
    ing.publish(t0, MAGIC + b"\x09" + p0, None)  # unknown version
    t1, p1, _ = msgs[1]
    ing.publish(t1, encode_id_frame(msgs[2][2].encode(), p1), None)  # another message's id
    for t, p, m in msgs[2:]:
        ing.publish(t, encode_id_frame(m.encode(), p), None)
    ing.publish(*batch)
    out, reports = ing.finish()
    assert sorted(v.message_id for v in out) == sorted(m for _, _, m in msgs[2:])
    kinds = [(r.kind, r.detail) for r in reports]
    assert sum("malformed id frame (truncated message id" in d for _, d in kinds) == 1
    assert sum("malformed id frame (unsupported id frame version 9" in d for _, d in kinds) == 1
    assert all(k == "unverifiable" for k, d in kinds if "malformed" in d)
    # the frame's id is bound by the signed leaf: a lie is not accepted as that message
    assert not any(v.payload == b"v11" for v in out)


# =========================================================================== the gateway side


def test_protector_marks_protected_messages_of_311_upstreams_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    store.create_identity()
    store.create_recipient()
    ups = [UpstreamSettings("v4", ("mqtt://127.0.0.1:1",), topic_prefix="edge/gw/", protocol=4),
           UpstreamSettings("v5", ("mqtt://127.0.0.1:1",), topic_prefix="edge/gw/")]
    own = b"\x03\x23\x00\x01"  # the device's own properties (topic alias 1)

    async def run(up: str) -> tuple[int, dict[int, Any]]:
        q = ForwardQueue(tmp_path / f"{up}.db", durability="normal", commit_delay=0.001)
        rule = ForwardRule("s/#", up, encrypt=True, sign=True)
        prot = Protector(GW, SecuritySettings(batch_size=64), [rule], ups, q, store.directory)
        mid = prot.put(rule, "edge/gw/s/1", b"x", 1, own, None)
        fut = q.commit_future()
        if fut is not None:
            await fut
        rows = {m.id: m.props for m in q.fetch(up, 100)}
        await q.close()
        return mid, rows

    mid, rows = asyncio.run(run("v4"))
    assert rows[mid] == FRAME_PROPS
    assert [p for i, p in rows.items() if i != mid] == [b""]  # the session header: no frame
    mid, rows = asyncio.run(run("v5"))
    assert rows[mid] == own  # MQTT 5: the properties go on, the id as rmq-id


def test_uplink_frames_marked_messages_on_311_and_keeps_the_property_on_5(
        mosquitto_factory: Callable[..., MosquittoBroker],
        subscribers: Callable[..., Subscriber]) -> None:
    broker = mosquitto_factory(UNLIMITED)
    sub = subscribers(broker.port, "up/#", 1, v5=True)
    n = 20

    def fill() -> MemorySource:
        src = MemorySource()
        for i in range(n):
            src.put("up/d", b"%08d" % i)
            if i % 2:  # a protected rule's message (as the Protector queues it)
                src.msgs[i] = Outgoing(i, "up/d", b"%08d" % i, 1, FRAME_PROPS)
        return src

    async def main(version: int, src: MemorySource) -> None:
        client = UplinkClient("cloud", [url(broker.port)], f"gw-frame-{version}", src,
                              version=version, gateway_id="gw7")

        async def body() -> None:
            while len(src.acked) < n:
                await asyncio.sleep(0.01)

        await run_client(client, body, 20)

    asyncio.run(main(4, fill()))
    asyncio.run(main(5, fill()))
    deadline = asyncio.run(_settle(lambda: len(sub.payloads) >= 2 * n))
    assert deadline
    v4, v5 = sub.payloads[:n], sub.payloads[n:]
    for i, p in enumerate(v4):
        assert p == (encode_id_frame(b"gw7:%d" % i, b"%08d" % i) if i % 2 else b"%08d" % i)
    assert v5 == [b"%08d" % i for i in range(n)]  # MQTT 5: never framed
    assert sub.props[:n] == [[]] * n
    assert sub.props[n:] == [[("rmq-id", f"gw7:{i}")] for i in range(n)]


async def _settle(pred: Callable[[], Any], timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())
