"""Unit tests of the forwarding-path protection helpers, the sans-I/O verifier, sinks, config."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from rapidmq_edge.cloud.sinks import JsonlSink, SqliteSink
from rapidmq_edge.cloud.verify import Ingest, Verified
from rapidmq_edge.config import ConfigError, parse_config
from rapidmq_edge.config.forwarding import ForwardRule, UpstreamSettings
from rapidmq_edge.config.security import SecuritySettings
from rapidmq_edge.crypto.batch import BatchBuilder, message_leaf, verify_chain
from rapidmq_edge.crypto.batch_message import (
    encode_batch_message,
    fast_leaf,
    id_runs,
    runs_to_ids,
)
from rapidmq_edge.crypto.batchlog import read_chain
from rapidmq_edge.crypto.envelope import Opener, Sealer, tstr
from rapidmq_edge.crypto.keys import (
    GatewayIdentity,
    RecipientKey,
    RecipientKeyring,
    VerifierKeyring,
)
from rapidmq_edge.crypto.keystore import KeyStore
from rapidmq_edge.crypto.signed_session import open_signed_session, sign_session
from rapidmq_edge.pipeline.protect import Protector
from rapidmq_edge.store.forward_queue import ForwardQueue

GW = "gw-unit"


@pytest.mark.parametrize("topic", ["t", "a" * 23, "b" * 24, "c/" * 200, "ü/" * 40000])
def test_fast_leaf_and_tstr_match_the_generic_cbor_encoding(topic: str) -> None:
    import cbor2

    assert tstr(topic) == cbor2.dumps(topic)
    payload = topic.encode()[:50]
    assert fast_leaf(f"{GW}:17", topic, payload) == message_leaf(f"{GW}:17", topic, payload)


def test_seal_raw_fast_path_opens_with_the_generic_opener() -> None:
    rec = RecipientKey.generate()
    sealer = Sealer(rec.public(), GW, max_messages=10_000)
    opener = Opener(RecipientKeyring([rec]), replay_window=1 << 12)
    topic = "x/" * 150  # > 255 bytes: long CBOR heads
    for seq in range(300):  # past 255: two-byte Partial IV
        env = sealer.seal_raw(b"p%d" % seq, sealer.topic_tstr(topic), tstr(f"{GW}:{seq}"))
        if seq == 0:
            opener.add_session(sealer.header)
        assert opener.open(env, topic=topic, message_id=f"{GW}:{seq}").plaintext == b"p%d" % seq


def test_id_runs_round_trip_and_reject_bad_shapes() -> None:
    ids = [3, 4, 5, 9, 10, 20]
    assert id_runs(ids) == [3, 3, 9, 2, 20, 1]
    assert runs_to_ids(id_runs(ids)) == ids
    assert id_runs([7, 8, 9, 10]) == [7, 4] and id_runs([5]) == [5, 1] and id_runs([]) == []
    from rapidmq_edge.crypto.errors import MalformedError

    bad_runs: list[list[Any]] = [[1], [1, -2], ["a", 1], [0, 1 << 30]]
    for bad in bad_runs:
        with pytest.raises(MalformedError):
            runs_to_ids(bad)


def _stream(
    manifest_leaves: bool, n: int = 6, signed_session: bool = False
) -> tuple[list[Any], VerifierKeyring, RecipientKeyring]:
    rec, ident = RecipientKey.generate(), GatewayIdentity.generate()
    sealer = Sealer(rec.public(), GW)
    builder = BatchBuilder(ident, GW)
    header = sealer.session_header
    if signed_session:
        header = sign_session(header, ident)
    stream: list[Any] = [(f"edge/{GW}/_session", header, None)]
    qids = list(range(10, 10 + n))
    for q in qids:
        topic, mid = f"edge/{GW}/s/{q}", f"{GW}:{q}"
        env = sealer.seal(b"v%d" % q, topic=topic, message_id=mid).envelope
        builder.add(mid, topic, env)
        stream.append((topic, env, mid))
    batch = builder.seal()
    assert batch is not None
    stream.append((f"edge/{GW}/_batch", encode_batch_message(batch, qids, manifest_leaves), None))
    return stream, VerifierKeyring([ident.public()]), RecipientKeyring([rec])


@pytest.mark.parametrize("leaves", [True, False])
def test_ingest_verifies_both_manifests_and_reports_a_missing_message(leaves: bool) -> None:
    stream, ids, recs = _stream(leaves)
    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    for item in stream:
        ing.publish(*item)
    out, reports = ing.finish()
    assert [v.payload for v in out] == [b"v%d" % q for q in range(10, 16)] and not reports

    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    for item in stream[:2] + stream[3:]:  # message 11 lost
        ing.publish(*item)
    out, reports = ing.finish()
    kinds = sorted(r.kind for r in reports)
    assert ("missing-message", f"{GW}:11") in {(r.kind, r.message_id) for r in reports}
    if leaves:  # each message verifies on its own
        assert len(out) == 5 and kinds == ["missing-message"]
    else:  # all or nothing: the rest is reported, never accepted
        assert out == [] and kinds == ["missing-message"] + ["unverifiable"] * 5


def test_signed_session_lets_each_encrypted_message_verify_without_leaves() -> None:
    """No leaves in the batch, the session header signed: a lost message costs only itself,
    and two consumers of a shared subscription (each gets half) verify their own halves."""
    stream, ids, recs = _stream(False, signed_session=True)
    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    for item in stream[:2] + stream[3:]:  # message 11 lost
        ing.publish(*item)
    out, reports = ing.finish()
    assert [v.payload for v in out] == [b"v%d" % q for q in (10, 12, 13, 14, 15)]
    assert [(r.kind, r.message_id) for r in reports] == [("missing-message", f"{GW}:11")]

    got: list[bytes] = []
    for half in (0, 1):  # session and batch reach both; the data messages alternate
        ing = Ingest(ids, recs, grace=1.0, chain_start=0, report_missing=False)
        data = [x for i, x in enumerate(stream[1:-1]) if i % 2 == half]
        for item in [stream[-1], *data, stream[0]]:  # batch first, session last
            ing.publish(*item)
        out, reports = ing.finish()
        assert not reports and len(out) == 3 and all(v.encrypted for v in out)
        got += [v.payload for v in out]
    assert sorted(got) == sorted(b"v%d" % q for q in range(10, 16))


def test_forged_envelopes_and_sessions_are_not_accepted_without_leaves() -> None:
    stream, ids, recs = _stream(False, signed_session=True)
    # an attacker who knows the recipient public key makes its own (unsigned) session and
    # replaces message 12 with its own envelope under the same id and topic
    header, _kid = open_signed_session(stream[0][1], ids)
    from rapidmq_edge.crypto.envelope import parse_session_header

    info = parse_session_header(header)[0]
    attacker_key = recs[info.recipient_kid].public()
    forger = Sealer(attacker_key, GW)
    topic, _env, mid = stream[3]
    forged = forger.seal(b"evil", topic=topic, message_id=mid)
    tampered = list(stream)
    tampered[3] = (topic, forged.envelope, mid)
    tampered.insert(1, (f"edge/{GW}/_session", forged.session_header, None))
    ing = Ingest(ids, recs, grace=1.0, chain_start=0)
    for item in tampered:
        ing.publish(*item)
    out, reports = ing.finish()
    assert b"evil" not in [v.payload for v in out] and len(out) == 5
    assert [(r.kind, r.message_id) for r in reports] == [("tampered", mid)]

    # a session header signed by an identity the consumer does not trust: held, then
    # reported, and its messages never verify; a flipped signature bit: tampered
    other = sign_session(header, GatewayIdentity.generate())
    flipped = bytearray(stream[0][1])
    flipped[-5] ^= 1
    for bad, kind in ((other, "wrong-key"), (bytes(flipped), "tampered")):
        ing = Ingest(ids, recs, grace=1.0, chain_start=0)
        for item in [(stream[0][0], bad, None), *stream[1:]]:
            ing.publish(*item)
        out, reports = ing.finish()
        assert out == [] and kind in {r.kind for r in reports}
        assert {r.kind for r in reports} <= {kind, "unverifiable"}


@pytest.mark.parametrize("sign_only", [False, True])
def test_auto_manifest_carries_leaves_only_for_unencrypted_messages(
    tmp_path: Path, sign_only: bool
) -> None:
    """``manifest = "auto"``: encrypted messages -> ids only (~32 B/msg less); a signed-only
    rule's messages need their leaves, so their batch carries them. Both verify."""
    from rapidmq_edge.crypto.batch_message import decode_batch_message

    store = KeyStore(tmp_path / "keys")
    store.create_identity()
    store.create_recipient()
    enc = ForwardRule("s/#", "c", encrypt=True, sign=True)
    plain = ForwardRule("p/#", "c", encrypt=False, sign=True)
    ups = [UpstreamSettings("c", ("mqtt://127.0.0.1:1",), topic_prefix="edge/gw/")]

    async def run() -> list[tuple[str, bytes, str]]:
        q = ForwardQueue(tmp_path / "forward.db", durability="normal", commit_delay=0.001)
        prot = Protector("gw", SecuritySettings(batch_size=4, batch_max_age=3600),
                         [enc, plain], ups, q, store.directory)
        for i in range(4):
            rule = plain if sign_only and i == 2 else enc
            prot.put(rule, f"edge/gw/{'p' if rule is plain else 's'}/{i}", b"x%d" % i, 1,
                     b"", None)
        fut = q.commit_future()
        if fut is not None:
            await fut
        rows = [(m.topic, m.payload, f"gw:{m.id}") for m in q.fetch("c", 100)]
        await q.close()
        return rows

    rows = asyncio.run(run())
    batch = [p for t, p, _ in rows if t.endswith("_batch")]
    assert len(batch) == 1
    leaves = decode_batch_message(batch[0])[2]
    assert (leaves is not None) == sign_only
    session = [p for t, p, _ in rows if t.endswith("_session")]
    assert len(session) == 1 and open_signed_session(session[0], store.verifier_keyring())
    ing = Ingest(store.verifier_keyring(), store.recipient_keyring(), grace=3600)
    for row in rows:
        ing.publish(*row)
    out, reports = ing.finish()
    assert sorted(v.payload for v in out) == [b"x%d" % i for i in range(4)] and not reports


def test_sinks_deduplicate_across_reopen(tmp_path: Path) -> None:
    v = Verified(f"{GW}:1", GW, "t", b"\xff\x00", 0, True, False)
    for cls, name in ((JsonlSink, "o.jsonl"), (SqliteSink, "o.sqlite")):
        sink = cls(tmp_path / name)
        assert sink.write([v, v]) == 1
        sink.close()
        sink = cls(tmp_path / name)
        assert sink.has(v.message_id) and sink.write([v]) == 0
        sink.close()


def _cfg(forward: dict[str, Any], protocol: int = 5, **extra: Any) -> Any:
    data = {
        "upstream": [{"name": "c", "urls": ["mqtt://127.0.0.1:1883"], "protocol": protocol},
                     {"name": "d", "urls": ["mqtt://127.0.0.1:1884"]}],
        "forward": [{"filter": "a/#", "upstream": "c", **forward}],
        **extra,
    }
    return parse_config(data, Path("/tmp"))


def test_config_shape_and_clear_errors() -> None:
    cfg = _cfg({"encrypt": True}, security={"batch_size": 64, "manifest": "ids"})
    rule = cfg.forwarding.forward[0]
    assert rule.encrypt and rule.sign  # sign follows encrypt by default
    assert cfg.forwarding.security.batch_size == 64
    assert cfg.forwarding.security.manifest == "ids"
    assert not _cfg({}).forwarding.forward[0].sign
    # MQTT 3.1.1 upstreams take protected rules: the id travels in the payload's id frame
    assert _cfg({"encrypt": True}, protocol=4).forwarding.forward[0].encrypt
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"encrypt": True, "sign": False}, {}, r"forward\[0\]\.sign"),
        ({"sign": "yes"}, {}, r"forward\[0\]\.sign"),
    ]
    for fwd, kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            _cfg(fwd, **kw)
    with pytest.raises(ConfigError, match="one upstream"):
        parse_config({
            "upstream": [{"name": "c", "urls": ["mqtt://h:1"]}, {"name": "d", "urls": ["mqtt://h:2"]}],
            "forward": [{"filter": "a/#", "upstream": "c", "sign": True},
                        {"filter": "b/#", "upstream": "d", "sign": True}],
        }, Path("/tmp"))
    with pytest.raises(ConfigError, match="security.batch_size"):
        _cfg({}, security={"batch_size": 0})
    with pytest.raises(ConfigError, match="security.manifest"):
        _cfg({}, security={"manifest": "all"})
    with pytest.raises(ConfigError, match="did you mean"):
        _cfg({}, security={"batch_sise": 4})


def test_protector_chain_survives_reopen_and_failed_batch_put(tmp_path: Path) -> None:
    """Leaves written with their queue rows; reopen carries pending leaves into the next batch."""
    store = KeyStore(tmp_path / "keys")
    store.create_identity()
    store.create_recipient()
    rule = ForwardRule("s/#", "c", encrypt=True, sign=True)
    ups = [UpstreamSettings("c", ("mqtt://127.0.0.1:1",), topic_prefix="edge/gw/")]

    async def run(n: int, seal: bool) -> int:
        q = ForwardQueue(tmp_path / "forward.db", durability="normal", commit_delay=0.001)
        prot = Protector("gw", SecuritySettings(batch_size=4, batch_max_age=3600), [rule], ups,
                         q, store.directory)
        carried = len(prot._open)
        for i in range(n):
            prot.put(rule, f"edge/gw/s/{i}", b"x%d" % i, 1, b"", None)
        if seal:
            prot.seal()
        fut = q.commit_future()
        if fut is not None:
            await fut
        await q.close()
        return carried

    assert asyncio.run(run(6, False)) == 0  # one batch of 4 sealed, 2 leaves pending
    assert asyncio.run(run(1, True)) == 2  # the 2 pending leaves were carried over
    report = verify_chain(read_chain(tmp_path / "forward.db"), store.verifier_keyring(),
                          gateway_id="gw")
    assert report.ok and report.batches == 2 and report.messages == 7


def test_gateway_refuses_to_start_without_keys_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    conf = tmp_path / "g.toml"
    conf.write_text(
        f'[gateway]\nid = "x"\ndata_dir = "{tmp_path / "data"}"\n'
        '[mqtt]\nlisten = ["tcp://127.0.0.1:0"]\n'
        '[[upstream]]\nname = "c"\nurls = ["mqtt://127.0.0.1:1"]\n'
        '[[forward]]\nfilter = "a/#"\nupstream = "c"\nencrypt = true\n'
    )
    res = subprocess.run([sys.executable, "-m", "rapidmq_edge", "run", "--config", str(conf)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2  # found before starting, with everything else wrong
    err = res.stderr.splitlines()
    assert any("security.keys_dir: no active identity key" in e and "keys init" in e
               for e in err), err
    assert any("security.keys_dir: no recipient public key" in e and "keys import-recipient"
               in e for e in err), err
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("gw", ["gw", "a-gateway-id-longer-than-23-bytes"])
def test_protector_one_message_sessions_all_verify(tmp_path: Path, gw: str) -> None:
    """``session_max_messages = 1``: every envelope gets its own session header, queued before
    it, and the consumer verifies and decrypts each one (short and long CBOR message ids)."""
    store = KeyStore(tmp_path / "keys")
    store.create_identity()
    store.create_recipient()
    rule = ForwardRule("s/#", "c", encrypt=True, sign=True)
    prefix = f"edge/{gw}/"
    ups = [UpstreamSettings("c", ("mqtt://127.0.0.1:1",), topic_prefix=prefix)]

    async def run() -> list[tuple[str, bytes, str]]:
        q = ForwardQueue(tmp_path / "forward.db", durability="normal", commit_delay=0.001)
        settings = SecuritySettings(batch_size=3, batch_max_age=3600, session_max_messages=1)
        prot = Protector(gw, settings, [rule], ups, q, store.directory)
        for i in range(5):
            prot.put(rule, f"{prefix}s/{i}", b"x%d" % i, 1, b"", None)
        prot.seal()
        fut = q.commit_future()
        if fut is not None:
            await fut
        rows = [(m.topic, m.payload, f"{gw}:{m.id}") for m in q.fetch("c", 100)]
        await q.close()
        return rows

    rows = asyncio.run(run())
    assert sum(t.endswith("_session") for t, _, _ in rows) == 5
    ing = Ingest(store.verifier_keyring(), store.recipient_keyring(), prefix="edge/{gateway_id}/",
                 grace=3600)
    for row in rows:
        ing.publish(*row)
    out, reports = ing.finish()
    assert sorted(v.payload for v in out) == [b"x%d" % i for i in range(5)] and not reports


@pytest.mark.parametrize("batch_timeout", [None, 30.0])
def test_message_waits_for_its_session_header_as_long_as_for_its_batch(
        batch_timeout: float | None) -> None:
    """A session header comes late like a batch header (a broker re-sending what a dead
    consumer left unacknowledged after its ack wait): with --batch-timeout its messages wait
    that long, not --grace (they were reported unverifiable while the header was on its way)."""
    stream, ids, recs = _stream(True, n=3)
    now = [0.0]
    ing = Ingest(ids, recs, grace=1.0, chain_start=0, batch_timeout=batch_timeout,
                 clock=lambda: now[0])
    for item in stream[1:]:  # messages and batch; the session header is late
        ing.publish(*item)
    now[0] = 5.0
    out, reports = ing.poll()
    if batch_timeout is None:  # the grace rule: reported, never accepted
        assert not out and [r.detail for r in reports] == ["session header never arrived"] * 3
        return
    assert not out and not reports and len(ing.waiting_ids()) == 3
    ing.publish(*stream[0])
    out, reports = ing.poll()
    assert [v.payload for v in out] == [b"v10", b"v11", b"v12"] and not reports


@pytest.mark.parametrize("leaves", [True, False])
def test_a_message_reported_missing_batch_still_verifies_when_its_batch_comes_late(
        leaves: bool) -> None:
    """Past --batch-timeout a message no batch covers is reported ``missing-batch`` once, and
    kept: its batch, held up longer by an outage of the gateway's uplink, still verifies it
    (the NATS chaos run lost such a message when the report dropped it)."""
    stream, ids, recs = _stream(leaves, n=3, signed_session=not leaves)
    now = [0.0]
    ing = Ingest(ids, recs, grace=1.0, chain_start=0, batch_timeout=30.0, clock=lambda: now[0])
    for item in stream[:-1]:  # session header and messages; the batch is late
        ing.publish(*item)
    now[0] = 31.0
    out, reports = ing.poll()
    assert not out and [r.kind for r in reports] == ["missing-batch"] * 3
    assert "waits on" in reports[0].detail and len(ing.waiting_ids()) == 3
    now[0] = 95.0
    assert ing.poll() == ([], [])  # reported once, not at every poll
    ing.publish(*stream[-1])
    out, reports = ing.poll()
    assert [v.payload for v in out] == [b"v10", b"v11", b"v12"] and not reports
    assert not ing.waiting_ids()
