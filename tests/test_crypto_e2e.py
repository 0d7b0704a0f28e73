"""End to end: devices -> real gateway (encrypt + sign) -> real Mosquitto -> cloud ingest.

Every test runs the real gateway process (tests/gateway_proc.py) and the consumer in-process
(``run_ingest``: the same code as ``rapidmq-edge cloud ingest``) over real MQTT 5 connections.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware_sim.e2e import DeviceSealer
from rapidmq_edge.crypto.batch import parse_signed_header, verify_chain
from rapidmq_edge.crypto.batchlog import read_chain
from rapidmq_edge.crypto.keys import RecipientPublicKey
from rapidmq_edge.crypto.keystore import KeyStore

from .conftest import MosquittoBroker
from .crypto_e2e_helpers import (
    GW,
    capture,
    consume,
    gateway_config,
    make_keys,
    publish_qos1,
)
from .gateway_proc import GatewayProcess


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _audit(data_dir: Path, trust: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # no --chain: the default is the gateway's own (forward.db)
        [sys.executable, "-m", "rapidmq_edge", "audit", "verify", "--data-dir",
         str(data_dir), "--public-key", str(trust), "--gateway-id", GW],
        capture_output=True, text=True, timeout=30,
    )


def test_round_trip_encrypted_signed_and_device_e2e(
    tmp_path: Path, mosquitto: MosquittoBroker,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    keys = make_keys(tmp_path)
    gw = gateway_factory(gateway_config(mosquitto.port, keys, batch_size=16))
    device = DeviceSealer(RecipientPublicKey.from_cose(
        KeyStore(keys.cloud).public_cose("recipient")), "sensors/secret/#")
    msgs = [(f"sensors/line{i % 3}/temp", f'{{"t": {20 + i}}}'.encode()) for i in range(40)]
    secret = [("sensors/secret/door", b"open"), ("sensors/secret/code", b"4711")]
    out = tmp_path / "out.jsonl"

    async def main() -> tuple[dict[str, int], list[Any], list[Any]]:
        ready = asyncio.Event()
        cons = asyncio.create_task(consume(mosquitto.port, keys, out, ready=ready, idle=1.5))
        await ready.wait()
        wire_ready = asyncio.Event()
        wire_task = asyncio.create_task(capture(
            mosquitto.port, lambda got: len(got) >= 45, timeout=8, ready=wire_ready))
        await asyncio.wait_for(wire_ready.wait(), 8)  # the session header is sent first
        sealed = [(t, device.seal(t, p)) for t, p in secret]
        acked = await asyncio.to_thread(publish_qos1, gw.port, msgs + sealed + [("plain/x", b"p")])
        assert acked == len(msgs) + len(secret) + 1
        wire = await wire_task
        counts, reports = await cons
        return counts, reports, wire

    counts, reports, wire = asyncio.run(main())
    got = {r["payload"]: r for r in _lines(out)}
    assert set(got) == {p.decode() for _, p in msgs + secret}  # all verified, once each
    assert counts["verified"] == 42 and len(_lines(out)) == 42
    assert all(r["encrypted"] for r in got.values())
    assert got["open"]["device_e2e"] and got["4711"]["device_e2e"]
    assert got["open"]["topic"] == f"edge/{GW}/sensors/secret/door"
    # the unprotected plain/x message is not accepted as verified: it is reported
    assert [r.kind for r in reports] == ["unverifiable"]
    # nothing readable on the wire for protected topics; batches and a session were sent
    data = [(t, p) for t, p, _ in wire if "/sensors/" in t]
    assert data and all(b'"t"' not in p and b"open" not in p for _, p in data)
    assert any(t.endswith("/_batch") for t, _, _ in wire)
    assert any(t.endswith("/_session") for t, _, _ in wire)
    assert all(mid and mid.startswith(f"{GW}:") for t, _, mid in wire if "/sensors/" in t)
    # the operator sees the batch chain and which code path protects the messages
    deadline, text = time.monotonic() + 15, ""
    while time.monotonic() < deadline and "batches signed" not in text:
        time.sleep(0.3)
        text = subprocess.run(
            [sys.executable, "-m", "rapidmq_edge", "status", "--data-dir", str(gw.data_dir)],
            capture_output=True, text=True, timeout=20).stdout
    assert "  post-quantum: " in text and "batches signed" in text, text
    assert "(c path)" in text, text  # make test builds the C accelerator
    gw.stop()
    res = _audit(gw.data_dir, keys.trust)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout.lower()


def test_two_consumers_in_one_shared_group_get_everything_once(
    tmp_path: Path, mosquitto: MosquittoBroker,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """One consumer in-process, one through the real ``rapidmq-edge cloud ingest`` CLI."""
    keys = make_keys(tmp_path)
    gw = gateway_factory(gateway_config(mosquitto.port, keys, batch_size=32))
    msgs = [(f"sensors/d{i % 5}", f"m{i}".encode()) for i in range(120)]
    out_a, out_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cli = subprocess.Popen(
        [sys.executable, "-m", "rapidmq_edge", "cloud", "ingest",
         "--upstream", f"mqtt://127.0.0.1:{mosquitto.port}", "--keys-dir", str(keys.cloud),
         "--trust", str(keys.trust), "--out", str(out_b), "--group", "g1",
         "--idle-exit", "2", "--grace", "1", "--chain-start", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert cli.stderr is not None
        assert cli.stderr.readline().strip() == "cloud ingest: subscribed"

        async def main() -> tuple[dict[str, int], list[Any]]:
            ready = asyncio.Event()
            task = asyncio.create_task(
                consume(mosquitto.port, keys, out_a, ready=ready, group="g1", idle=2.0))
            await ready.wait()
            assert await asyncio.to_thread(publish_qos1, gw.port, msgs) == len(msgs)
            return await task

        counts, reports = asyncio.run(main())
        stdout, stderr = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, stderr
    cli_counts = json.loads(stdout)
    a, b = ({r["payload"] for r in _lines(o)} for o in (out_a, out_b))
    assert a and b, "the broker should spread the group's messages over both consumers"
    assert not a & b
    assert a | b == {p.decode() for _, p in msgs}
    assert not reports, reports
    assert counts["batches"] >= 4 and cli_counts["batches"] >= 4  # both see every batch
    assert cli_counts["verified"] == len(b)


def test_key_rotation_mid_stream(
    tmp_path: Path, mosquitto: MosquittoBroker,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    keys = make_keys(tmp_path)
    gw = gateway_factory(gateway_config(mosquitto.port, keys, batch_size=8))
    out = tmp_path / "out.jsonl"
    first = [(f"sensors/a{i}", f"old{i}".encode()) for i in range(20)]
    second = [(f"sensors/b{i}", f"new{i}".encode()) for i in range(20)]
    gw_store, cloud = KeyStore(keys.gateway), KeyStore(keys.cloud)
    old_identity = keys.trust.read_bytes()

    async def main() -> tuple[dict[str, int], list[Any]]:
        ready = asyncio.Event()
        cons = asyncio.create_task(consume(
            mosquitto.port, keys, out, ready=ready, idle=3.0, trust=(keys.trust, new_trust)))
        await ready.wait()
        assert await asyncio.to_thread(publish_qos1, gw.port, first) == 20
        # rotate both: the cloud's recipient key (imported on the gateway) and the identity
        cloud.create_recipient()
        gw_store.import_recipient_public(cloud.public_cose("recipient"))
        gw_store.create_identity()
        new_trust.write_bytes(gw_store.public_cose("identity"))
        await asyncio.sleep(2.0)  # the gateway checks its key index once a second
        assert await asyncio.to_thread(publish_qos1, gw.port, second) == 20
        return await cons

    new_trust = tmp_path / "identity-new.cose"
    new_trust.write_bytes(old_identity)  # replaced after the rotation
    counts, reports = asyncio.run(main())
    assert not reports, reports
    assert {r["payload"] for r in _lines(out)} == {p.decode() for _, p in first + second}
    assert counts["sessions"] >= 2
    assert "sealing to recipient key" in gw.log() and "signing batches with identity" in gw.log()
    gw.stop()
    chain = list(read_chain(gw.data_dir / "forward.db"))
    report = verify_chain(chain, gw_store.verifier_keyring(), gateway_id=GW)
    assert report.ok and report.messages == 40
    kids = {parse_signed_header(e.signed)[1] for e in chain}
    assert len(kids) == 2


def test_kill9_mid_batch_loses_no_acked_message(
    tmp_path: Path, mosquitto: MosquittoBroker,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    keys = make_keys(tmp_path)
    cfg = gateway_config(mosquitto.port, keys, batch_size=1000, batch_max_age=0.5)
    cfg["upstream"][0]["urls"] = [f"mqtt://127.0.0.1:{mosquitto.port}"]
    gw = gateway_factory(cfg)
    out = tmp_path / "out.jsonl"
    before = [(f"sensors/k{i % 4}", f"pre{i}".encode()) for i in range(60)]
    after = [(f"sensors/k{i % 4}", f"post{i}".encode()) for i in range(20)]

    async def main() -> tuple[dict[str, int], list[Any]]:
        ready = asyncio.Event()
        cons = asyncio.create_task(
            consume(mosquitto.port, keys, out, ready=ready, idle=3.0, grace=6.0))
        await ready.wait()
        assert await asyncio.to_thread(publish_qos1, gw.port, before) == 60
        gw.kill()  # within the batch's 0.5 s: every acked leaf is pending, none sealed
        res = _audit(gw.data_dir, keys.trust)
        assert res.returncode == 0, res.stdout + res.stderr
        import sqlite3

        db = sqlite3.connect(gw.data_dir / "forward.db")
        pending = sum(
            len(bytes(r[0])) // 32 for r in db.execute("SELECT leaves FROM chain_pending"))
        batched = sum(len(bytes(r[0])) // 32 for r in db.execute("SELECT leaves FROM batches"))
        db.close()
        assert pending + batched >= 60  # every acked message: pending or in a signed batch
        gw.start()
        assert await asyncio.to_thread(publish_qos1, gw.port, after) == 20
        return await cons

    counts, reports = asyncio.run(main())
    assert not reports, reports
    assert {r["payload"] for r in _lines(out)} == {p.decode() for _, p in before + after}
    gw.stop()
    res = _audit(gw.data_dir, keys.trust)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "carried over" in gw.log()


def test_summaries_of_a_protected_rule_are_sealed_and_signed(
    tmp_path: Path, mosquitto: MosquittoBroker,
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    """Readings summarised under pressure leave as their rule's messages do: the summary of
    an ``encrypt`` + ``sign`` rule is an envelope in the signed batch chain that the cloud
    consumer verifies and opens (was: queued as plain JSON, bypassing the protection)."""
    keys = make_keys(tmp_path)
    cfg = gateway_config(mosquitto.port, keys, batch_size=4)
    cfg["forward"][0]["priority"] = "normal"  # a routine class: summarised under pressure
    cfg["intelligence"] = {"enabled": True, "priority": "rules", "anomaly": "off",
                           "threat": "off", "summarise_disk_percent": 0.01,  # always over
                           "summary_window_s": 0.5, "pressure_check_s": 0.05}
    gw = gateway_factory(cfg)
    values = [20.0 + i / 8 for i in range(12)]
    out = tmp_path / "out.jsonl"

    async def main() -> tuple[dict[str, int], list[Any]]:
        ready = asyncio.Event()
        cons = asyncio.create_task(consume(mosquitto.port, keys, out, ready=ready, idle=2.0))
        await ready.wait()
        wire_ready = asyncio.Event()
        wire_task = asyncio.create_task(capture(
            mosquitto.port, lambda got: any("/summary" in t for t, _, _ in got), timeout=10,
            ready=wire_ready))
        await asyncio.wait_for(wire_ready.wait(), 8)
        await asyncio.sleep(0.5)  # the pressure check has switched summarising on
        items = [("sensors/line1/temp", json.dumps({"value": v}).encode()) for v in values]
        assert await asyncio.to_thread(publish_qos1, gw.port, items) == len(items)
        wire = await wire_task
        counts, _ = await cons
        return counts, wire

    counts, wire = asyncio.run(main())
    summaries = [r for r in _lines(out) if r["topic"].endswith("/summary")]
    assert [json.loads(r["payload"])["count"] for r in summaries] == [12]
    assert summaries[0]["encrypted"] and counts["verified"] >= 1
    assert not [p for t, p, _ in wire if b'"summary"' in p or b'"count"' in p]
