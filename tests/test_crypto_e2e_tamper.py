"""Tamper matrix between the upstream and the consumer, through a real Mosquitto.

One gateway run is captured off the upstream; a test publisher then replays a modified copy of
that stream into a Mosquitto of its own (one per case, so the cases are isolated) and a
consumer on that broker must report each attack.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidmq_edge.crypto.envelope import Sealer
from rapidmq_edge.crypto.keystore import KeyStore

from .conftest import MosquittoBroker
from .crypto_e2e_helpers import (
    GW,
    Captured,
    capture,
    consume,
    gateway_config,
    make_keys,
    publish_qos1,
    replay,
)
from .gateway_proc import GatewayProcess

N = 24  # data messages, in batches of 8


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


def _cases(stream: list[Captured], keys: Any) -> dict[str, list[Captured]]:
    data = [m for m in stream if "/sensors/" in m[0]]
    batches = [m for m in stream if m[0].endswith("/_batch")]
    others = [m for m in stream if m not in data and m not in batches]
    k, j = data[5], data[6]

    def without(*gone: Captured) -> list[Captured]:
        return [m for m in stream if m not in gone]

    def replace(old: Captured, new: Captured) -> list[Captured]:
        return [new if m == old else m for m in stream]

    store = KeyStore(keys.cloud)
    from rapidmq_edge.crypto.keys import RecipientPublicKey

    attacker = Sealer(RecipientPublicKey.from_cose(store.public_cose("recipient")), GW)
    forged = attacker.seal(b"evil", topic=k[0], message_id=k[2] or "")
    middle = batches[1]
    return {
        "clean": list(stream),
        "reversed": list(reversed(others + batches + data)),
        "replay-same-id": [*stream, k],
        "replay-other-id": [*stream, (k[0], k[1], f"{GW}:99999")],
        "reorder-swap": [
            (k[0], j[1], k[2]) if m == k else (j[0], k[1], j[2]) if m == j else m
            for m in stream
        ],
        "bitflip": replace(k, (k[0], _flip(k[1], len(k[1]) // 2), k[2])),
        "truncate": replace(k, (k[0], k[1][:-5], k[2])),
        "delete-message": without(k),
        "delete-batch": without(middle),
        "bitflip-batch-signature": replace(middle, (middle[0], _flip(middle[1], 200), None)),
        "forged-session": [
            (f"edge/{GW}/_session", attacker.session_header, None),
            *replace(k, (k[0], forged.envelope, k[2])),
        ],
        "wrong-key": list(stream),
    }


EXPECT: dict[str, tuple[int, Counter[str]]] = {
    # case: (verified messages, report kinds)
    "clean": (N, Counter()),
    "reversed": (N, Counter()),
    "replay-same-id": (N, Counter()),  # dropped by id, counted as a duplicate
    "replay-other-id": (N, Counter({"unverifiable": 1})),
    "reorder-swap": (N - 2, Counter({"tampered": 2})),
    "bitflip": (N - 1, Counter({"tampered": 1})),
    "truncate": (N - 1, Counter({"tampered": 1})),
    "delete-message": (N - 1, Counter({"missing-message": 1})),
    "delete-batch": (N - 8, Counter({"unverifiable": 8, "missing-batch": 1})),
    "bitflip-batch-signature": (N - 8, Counter({
        "tampered": 1, "unverifiable": 8, "missing-batch": 1})),
    "forged-session": (N - 1, Counter({"tampered": 1})),
    "wrong-key": (0, Counter({"wrong-key": 4, "unverifiable": N})),
}


def test_every_tampering_is_reported_never_accepted(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker],
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    mq = mosquitto_factory()
    ports = [mosquitto_factory().port for _ in EXPECT]
    keys = make_keys(tmp_path)
    other = make_keys(tmp_path / "other")
    gw = gateway_factory(gateway_config(mq.port, keys, batch_size=8, batch_max_age=5.0))
    msgs = [(f"sensors/s{i % 3}", f"value-{i}".encode()) for i in range(N)]

    async def main() -> dict[str, tuple[dict[str, int], list[Any], list[dict[str, Any]]]]:
        def done(got: list[Captured]) -> bool:
            return sum(t.endswith("/_batch") for t, _, _ in got) >= 3 and sum(
                "/sensors/" in t for t, _, _ in got) >= N

        cap_ready = asyncio.Event()
        cap = asyncio.create_task(capture(mq.port, done, timeout=10, ready=cap_ready))
        await asyncio.wait_for(cap_ready.wait(), 10)  # subscribed before the first publish
        assert await asyncio.to_thread(publish_qos1, gw.port, msgs) == N
        stream = await cap
        assert done(stream), stream
        cases = _cases(stream, keys)
        readies = {name: asyncio.Event() for name in cases}
        tasks = {
            name: asyncio.create_task(consume(
                ports[i], other if name == "wrong-key" else keys, tmp_path / f"{name}.jsonl",
                ready=readies[name], idle=1.0, grace=0.4,
            ))
            for i, name in enumerate(cases)
        }
        for name, s in cases.items():
            await readies[name].wait()
            await replay(ports[list(cases).index(name)], s)
        out = {}
        for name, t in tasks.items():
            counts, reports = await t
            path = tmp_path / f"{name}.jsonl"
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            out[name] = (counts, reports, lines)
        return out

    results = asyncio.run(main())
    sent = {f"value-{i}" for i in range(N)}
    for name, (verified, kinds) in EXPECT.items():
        counts, reports, lines = results[name]
        assert Counter(r.kind for r in reports) == kinds, (name, reports)
        assert len(lines) == verified == counts["verified"], (name, counts)
        assert {x["payload"] for x in lines} <= sent, name  # nothing forged was written
        assert len({x["id"] for x in lines}) == len(lines), name
    assert results["replay-same-id"][0]["duplicates"] == 1
