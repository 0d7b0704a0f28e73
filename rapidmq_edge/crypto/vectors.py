"""Test vectors for other implementations (``python -m rapidmq_edge.crypto.vectors``).

Fixed seeds make keys, key ids, the session key schedule, nonces, per-message envelopes, Merkle
leaves/roots/proofs and batch header payloads deterministic. HPKE encapsulation and ML-DSA
signing are randomised by the libraries (no way to fix them through ``cryptography``'s API), so
the session header (and its signed form), device envelope and batch signature are *recorded*
values: check them in
the open/verify direction. ``check(vectors)`` re-derives and verifies everything.

Usage: ``python -m rapidmq_edge.crypto.vectors [--update-doc docs/crypto.md]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from . import cose
from .batch import BatchHeader, message_leaf, sign_batch_header, verify_batch
from .e2e import device_context, open_device_message, seal_for_recipient
from .envelope import Opener, Sealer, SessionKeys, _piv, message_aad
from .keys import GatewayIdentity, RecipientKey, RecipientKeyring, VerifierKeyring
from .merkle import MerkleTree, verify_inclusion
from .signed_session import open_signed_session, sign_session

__all__ = ["check", "generate"]

IDENTITY_SEED = bytes(range(32))
RECIPIENT_SEED = bytes(range(32, 64))
MASTER_SECRET = bytes(range(64, 96))
SESSION_ID = bytes.fromhex("0102030405060708")
GATEWAY = "gw-test"
CREATED = 1_767_225_600  # 2026-01-01T00:00:00Z
MESSAGES = [
    ("plant/line1/temp", f"{GATEWAY}:1", b'{"t":21.5}'),
    ("plant/line1/temp", f"{GATEWAY}:2", b'{"t":21.6}'),
    ("plant/line2/door", f"{GATEWAY}:3", b"open"),
]
BEGIN, END = "<!-- vectors:begin -->", "<!-- vectors:end -->"


def _deterministic(ident: GatewayIdentity, rec: RecipientKey) -> dict[str, Any]:
    keys = SessionKeys.derive(MASTER_SECRET, SESSION_ID)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(keys.key)
    msgs: list[dict[str, Any]] = []
    for seq, (topic, mid, payload) in enumerate(MESSAGES):
        aad = message_aad(SESSION_ID, _piv(seq), topic, GATEWAY, mid)
        ct = aead.encrypt(keys.nonce(seq), payload, aad)
        env = cose.dumps([b"", {4: SESSION_ID, 6: _piv(seq)}, ct])
        msgs.append(
            {
                "seq": seq,
                "topic": topic,
                "message_id": mid,
                "plaintext": payload.hex(),
                "nonce": keys.nonce(seq).hex(),
                "aad": aad.hex(),
                "envelope": env.hex(),
            }
        )
    leaves = [
        message_leaf(mid, topic, bytes.fromhex(m["envelope"]))
        for (topic, mid, _), m in zip(MESSAGES, msgs, strict=True)
    ]
    tree = MerkleTree(leaves)
    header = BatchHeader(
        GATEWAY,
        0,
        bytes(32),
        len(leaves),
        tree.root,
        MESSAGES[0][1],
        MESSAGES[-1][1],
        CREATED * 1000,
    )
    return {
        "identity": {
            "seed": IDENTITY_SEED.hex(),
            "public_key_sha256": hashlib.sha256(ident.public_key).hexdigest(),
            "kid": ident.kid.hex(),
            "cose_key_sha256": hashlib.sha256(ident.cose_public_key()).hexdigest(),
        },
        "recipient": {
            "seed": RECIPIENT_SEED.hex(),
            "public_key_sha256": hashlib.sha256(rec.public_key).hexdigest(),
            "kid": rec.kid.hex(),
            "cose_key_sha256": hashlib.sha256(rec.public().cose()).hexdigest(),
        },
        "session": {
            "gateway_id": GATEWAY,
            "session_id": SESSION_ID.hex(),
            "created": CREATED,
            "master_secret": MASTER_SECRET.hex(),
            "key": keys.key.hex(),
            "common_iv": keys.common_iv.hex(),
        },
        "messages": msgs,
        "merkle": {
            "leaf_hashes": [x.hex() for x in leaves],
            "root": tree.root.hex(),
            "proofs": [[p.hex() for p in tree.proof(i)] for i in range(len(leaves))],
        },
        "batch": {"payload": header.encode().hex()},
    }


def generate() -> dict[str, Any]:
    """Fresh vectors (deterministic parts + newly recorded randomised parts)."""
    ident = GatewayIdentity(IDENTITY_SEED)
    rec = RecipientKey(RECIPIENT_SEED)
    v = _deterministic(ident, rec)
    rand = iter([SESSION_ID, MASTER_SECRET])
    sealer = Sealer(
        rec.public(), GATEWAY, clock=lambda: float(CREATED), randbytes=lambda n: next(rand)
    )
    v["session"]["header"] = sealer.session_header.hex()
    v["session"]["signed"] = sign_session(sealer.session_header, ident).hex()
    header = BatchHeader.decode(bytes.fromhex(v["batch"]["payload"]))
    v["batch"]["signed"] = sign_batch_header(header, ident).hex()
    ctx = device_context("sensor-7", "plant/line1/temp")
    v["device"] = {
        "device_id": "sensor-7",
        "topic": "plant/line1/temp",
        "context": ctx.hex(),
        "plaintext": b"secret 42".hex(),
        "envelope": seal_for_recipient(rec.public(), b"secret 42", ctx).hex(),
    }
    return v


def check(v: dict[str, Any]) -> None:
    """Raise AssertionError / CryptoError unless the vectors re-derive and verify."""
    ident = GatewayIdentity(bytes.fromhex(v["identity"]["seed"]))
    rec = RecipientKey(bytes.fromhex(v["recipient"]["seed"]))
    expect = _deterministic(ident, rec)
    for part in ("identity", "recipient", "messages", "merkle", "batch"):
        for k, val in (
            expect[part].items() if isinstance(expect[part], dict) else enumerate(expect[part])
        ):
            got = v[part][k]
            assert got == val, f"{part}.{k} differs"
    for k in ("session_id", "master_secret", "key", "common_iv", "gateway_id", "created"):
        assert v["session"][k] == expect["session"][k], f"session.{k} differs"
    opener = Opener(RecipientKeyring([rec]))
    info = opener.add_session(bytes.fromhex(v["session"]["header"]))
    assert (
        info.session_id.hex() == v["session"]["session_id"]
        and info.gateway_id == v["session"]["gateway_id"]
    )
    # the header as published: signed by the identity (external AAD "rmq-session/1")
    inner, kid = open_signed_session(bytes.fromhex(v["session"]["signed"]),
                                     VerifierKeyring([ident.public()]))
    assert inner.hex() == v["session"]["header"] and kid == ident.kid
    for m in v["messages"]:
        got = opener.open(
            bytes.fromhex(m["envelope"]), topic=m["topic"], message_id=m["message_id"]
        )
        assert got.plaintext.hex() == m["plaintext"] and got.seq == m["seq"]
    header = verify_batch(bytes.fromhex(v["batch"]["signed"]), VerifierKeyring([ident.public()]))
    assert header.encode().hex() == v["batch"]["payload"]
    mk = v["merkle"]
    for i, leaf in enumerate(mk["leaf_hashes"]):
        proof = [bytes.fromhex(p) for p in mk["proofs"][i]]
        assert verify_inclusion(
            bytes.fromhex(leaf), i, len(mk["leaf_hashes"]), proof, bytes.fromhex(mk["root"])
        )
    d = v["device"]
    assert bytes.fromhex(d["context"]) == device_context(d["device_id"], d["topic"])
    pt = open_device_message(
        RecipientKeyring([rec]), bytes.fromhex(d["envelope"]), bytes.fromhex(d["context"])
    )
    assert pt.hex() == d["plaintext"]


def extract(markdown: str) -> dict[str, Any]:
    """The JSON vectors block of docs/crypto.md."""
    m = re.search(re.escape(BEGIN) + r"\s*```json\n(.*?)```\s*" + re.escape(END), markdown, re.S)
    if m is None:
        raise ValueError("no vectors block in the document")
    return dict(json.loads(m.group(1)))


def main(argv: list[str] | None = None) -> int:
    """Print fresh vectors as JSON, or replace the block in a markdown file."""
    ap = argparse.ArgumentParser(prog="python -m rapidmq_edge.crypto.vectors")
    ap.add_argument("--update-doc", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    v = generate()
    check(v)
    text = json.dumps(v, indent=1)
    if args.update_doc is None:
        print(text)
        return 0
    doc = args.update_doc.read_text()
    block = f"{BEGIN}\n```json\n{text}\n```\n{END}"
    if BEGIN in doc:
        doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
    else:
        doc += "\n" + block + "\n"
    args.update_doc.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
