"""The forwarding-path parts of ``bench/crypto_overhead.py`` (issue 5).

* :func:`gateway_path`: per-message CPU and bytes of ``pipeline.protect.Protector`` (sealing at
  enqueue, leaf, batch signing, chain rows written in the queue's transaction) against plain
  ``ForwardQueue.put`` (the reference), same process, same queue settings, at batch sizes
  1/64/256/1024; plus the consumer's verify + decrypt cost (``cloud.verify.Ingest``). CPU is
  ``time.process_time()`` (all threads: the SQLite writer thread is included).
* :func:`put_glue`: focused micro-bench of ``Protector.put`` x 1024 (one batch) vs plain put on
  the event-loop thread, minus the primitives' floor = the Python glue.
* :func:`forwarding_throughput`: devices (bench/loadgen.py, QoS 1, 256 B) -> gateway -> upstream
  Mosquitto -> loadgen subscriber, the same gateway config with ``encrypt = sign = true`` vs
  without, alternating runs (off, on, off, on...) in the same invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapidmq_edge.cloud.verify import Ingest  # noqa: E402
from rapidmq_edge.config.forwarding import ForwardRule, UpstreamSettings  # noqa: E402
from rapidmq_edge.config.security import SecuritySettings  # noqa: E402
from rapidmq_edge.crypto.batch_message import BATCH_SUFFIX, SESSION_SUFFIX  # noqa: E402
from rapidmq_edge.crypto.envelope import Sealer  # noqa: E402
from rapidmq_edge.crypto.keystore import KeyStore  # noqa: E402
from rapidmq_edge.pipeline.protect import Protector  # noqa: E402
from rapidmq_edge.store.forward_queue import ForwardQueue  # noqa: E402

GW = "bench-gw"
PREFIX = f"edge/{GW}/"
CHUNK = 256  # messages between group commits (the broker acks a commit group at once)


def _keys(tmp: Path) -> tuple[KeyStore, KeyStore]:
    gw, cloud = KeyStore(tmp / "gw-keys"), KeyStore(tmp / "cloud-keys")
    gw.create_identity()
    cloud.create_recipient()
    gw.import_recipient_public(cloud.public_cose("recipient"))
    return gw, cloud


async def _run_queue(
    path: Path, n: int, payload: bytes, topics: list[str], keys_dir: Path | None,
    batch_size: int, manifest: Literal["auto", "leaves", "ids"] = "auto",
) -> tuple[float, list[tuple[str, bytes, str]]]:
    """Put ``n`` messages (protected when ``keys_dir``); CPU seconds and the stored rows."""
    q = ForwardQueue(path, durability="normal", commit_delay=0.002)
    prot = None
    rule = ForwardRule("sensors/#", "cloud", encrypt=True, sign=True)
    if keys_dir is not None:
        prot = Protector(
            GW, SecuritySettings(batch_size=batch_size, batch_max_age=3600.0,
                                 manifest=manifest),
            [rule],
            [UpstreamSettings("cloud", ("mqtt://127.0.0.1:1",), topic_prefix=PREFIX)],
            q, keys_dir,
        )
    t0 = time.process_time()
    for start in range(0, n, CHUNK):
        for i in range(start, min(n, start + CHUNK)):
            if prot is not None:
                prot.put(rule, topics[i & 63], payload, 1, b"", None)
            else:
                q.put("cloud", 2, topics[i & 63], payload, 1, b"", None)
        fut = q.commit_future()
        if fut is not None:
            await fut
    if prot is not None:
        prot.seal()
    fut = q.commit_future()
    if fut is not None:
        await fut
    cpu = time.process_time() - t0
    rows = []
    for m in q.fetch("cloud", n + 10_000):
        rows.append((m.topic, m.payload, f"{GW}:{m.id}"))
    await q.close()
    return cpu, rows


def gateway_path(payload_size: int, n: int, rounds: int = 5) -> dict[str, Any]:
    """Per-message gateway CPU/bytes of the protected path vs plain put; consumer cost.

    CPU = min over ``rounds`` protected runs - min over as many plain runs, alternating
    (process CPU, writer thread included); the median of the pairwise differences beside it."""
    tmp = Path(tempfile.mkdtemp(prefix="pqwire-bench-"))
    try:
        gw, cloud = _keys(tmp)
        payload = os.urandom(payload_size)
        topics = [f"{PREFIX}plant/line{i % 8}/dev{i}/temp" for i in range(64)]
        out: dict[str, Any] = {"chunk": CHUNK}
        base_cpu, base_rows = asyncio.run(
            _run_queue(tmp / "plain.db", n, payload, topics, None, 1))
        base_bytes = sum(len(p) for _, p, _ in base_rows)
        out["plain_put"] = {"cpu_us": round(base_cpu / n * 1e6, 3)}
        recipients = cloud.recipient_keyring()
        identities = gw.verifier_keyring()
        sizes: dict[str, Any] = {}
        for size in (1, 64, 256, 1024):
            m = min(n, 600) if size == 1 else n
            prot_runs, plain_runs = [], []
            for r in range(rounds):  # alternating; min of each: noise only ever adds CPU
                cpu, rows = asyncio.run(_run_queue(
                    tmp / f"prot-{size}-{r}.db", m, payload, topics, gw.directory, size))
                b_cpu, _ = asyncio.run(_run_queue(
                    tmp / f"plain-{size}-{r}.db", m, payload, topics, None, size))
                prot_runs.append(cpu / m * 1e6)
                plain_runs.append(b_cpu / m * 1e6)
            runs = [a - b for a, b in zip(prot_runs, plain_runs, strict=True)]
            data = [x for x in rows if "/plant/" in x[0]]
            extra = sum(len(p) for _, p, _ in rows) - base_bytes * m // n
            ctl = {suffix: sum(len(p) for t, p, _ in rows if t.endswith(suffix))
                   for suffix in (BATCH_SUFFIX, SESSION_SUFFIX)}
            # consumer: verify batches + leaves, decrypt, dedup
            ing = Ingest(identities, recipients, prefix="edge/{gateway_id}/", grace=3600)
            t0 = time.process_time()
            for topic, body, mid in rows:
                ing.publish(topic, body, mid)
            verified, reports = ing.poll()
            c_cpu = time.process_time() - t0
            assert len(verified) == len(data) == m and not reports, (len(verified), reports)
            sizes[str(size)] = {
                "messages": m,
                "gateway_cpu_us_per_msg": round(min(prot_runs) - min(plain_runs), 3),
                "gateway_cpu_us_median_of_pairs": round(statistics.median(runs), 3),
                "protected_and_plain_cpu_us_min": [round(min(prot_runs), 3),
                                                   round(min(plain_runs), 3)],
                "consumer_cpu_us_per_msg": round(c_cpu / m * 1e6, 3),
                "bytes_per_msg": round(extra / m, 2),
                "bytes_breakdown_per_msg": {
                    "envelope": round((sum(len(p) for _, p, _ in data) - payload_size * m) / m, 2),
                    "batch_messages": round(ctl[BATCH_SUFFIX] / m, 2),
                    "session_headers": round(ctl[SESSION_SUFFIX] / m, 2),
                },
            }
        out["batch_sizes"] = sizes
        # the same at N = 1024 with manifest = "leaves" (every batch lists its 32 B leaves)
        cpu, rows = asyncio.run(_run_queue(
            tmp / "prot-leaves.db", n, payload, topics, gw.directory, 1024, "leaves"))
        b_cpu, _ = asyncio.run(_run_queue(tmp / "plain-leaves.db", n, payload, topics, None,
                                          1024))
        out["manifest_leaves_at_N1024"] = {
            "gateway_cpu_us_per_msg": round((cpu - b_cpu) / n * 1e6, 3),
            "bytes_per_msg": round((sum(len(p) for _, p, _ in rows) - base_bytes) / n, 2),
        }
        out["pure_python_at_N1024"] = pure_python_n1024(payload_size, n, rounds)
        out["primitive_floor_us_at_N1024"] = primitive_floor(payload_size)
        out["put_glue_at_N1024"] = put_glue(payload_size, gw.directory, tmp)
        out["seal_and_leaf_before_after"] = envelope_before_after(payload_size)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def n1024_delta(payload_size: int, n: int, rounds: int) -> float:
    """Protected - plain CPU µs per message at N = 1024 (min of ``rounds`` each)."""
    tmp = Path(tempfile.mkdtemp(prefix="pqwire-bench-"))
    try:
        gw, _cloud = _keys(tmp)
        payload = os.urandom(payload_size)
        topics = [f"{PREFIX}plant/line{i % 8}/dev{i}/temp" for i in range(64)]
        prot, plain = [], []
        for r in range(rounds):
            prot.append(asyncio.run(_run_queue(
                tmp / f"p{r}.db", n, payload, topics, gw.directory, 1024))[0])
            plain.append(asyncio.run(_run_queue(tmp / f"b{r}.db", n, payload, topics, None,
                                                1024))[0])
        return round((min(prot) - min(plain)) / n * 1e6, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pure_python_n1024(payload_size: int, n: int, rounds: int) -> dict[str, Any]:
    """The N = 1024 gateway CPU with the C accelerator vs without it
    (``RAPIDMQ_EDGE_PURE_PYTHON=1``), each in a fresh interpreter, side by side."""
    import json
    import subprocess

    from rapidmq_edge.crypto import accel

    code = (f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}]; "
            f"import crypto_forwarding as c; "
            f"print(c.n1024_delta({payload_size}, {n}, {rounds}))")
    out: dict[str, Any] = {"accelerator_built": accel.FASTPATH is not None}
    for label, extra in (("c_accelerator", {}), ("pure_python", {"RAPIDMQ_EDGE_PURE_PYTHON": "1"})):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **extra}, timeout=600, check=True)
        out[label + "_cpu_us_per_msg"] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def put_glue(payload_size: int, keys_dir: Path, tmp: Path, n: int = 1024,
             rounds: int = 30) -> dict[str, Any]:
    """Focused micro-bench: event-loop thread CPU (``time.thread_time``, so time lost to other
    processes is not counted) of ``Protector.put`` x N (one batch sealed: N = batch size) vs
    plain ``ForwardQueue.put`` x N, alternating, min over ``rounds``; with the primitives'
    floor measured right after: ``glue = (protected - plain) - floor``. The writer thread's
    SQLite work is not in this number (``batch_sizes`` above includes it)."""
    payload = os.urandom(payload_size)
    topics = [f"{PREFIX}plant/line{i % 8}/dev{i}/temp" for i in range(64)]
    rule = ForwardRule("sensors/#", "cloud", encrypt=True, sign=True)

    async def run() -> dict[str, list[float]]:
        qp = ForwardQueue(tmp / "glue-p.db", durability="normal", commit_delay=3600.0)
        qb = ForwardQueue(tmp / "glue-b.db", durability="normal", commit_delay=3600.0)
        prot = Protector(
            GW, SecuritySettings(batch_size=n, batch_max_age=3600.0), [rule],
            [UpstreamSettings("cloud", ("mqtt://127.0.0.1:1",), topic_prefix=PREFIX)],
            qp, keys_dir,
        )
        res: dict[str, list[float]] = {"protected": [], "plain": []}
        for _ in range(rounds):
            t = time.thread_time()
            for i in range(n):
                prot.put(rule, topics[i & 63], payload, 1, b"", None)
            t1 = time.thread_time()
            for i in range(n):
                qb.put("cloud", 2, topics[i & 63], payload, 1, b"", None)
            t2 = time.thread_time()
            res["protected"].append(t1 - t)
            res["plain"].append(t2 - t1)
            for q in (qp, qb):  # commit now (the long commit_delay kept the writer idle)
                fut = q.commit_future()
                q._flush()
                if fut is not None:
                    await fut
        await qp.close()
        await qb.close()
        return res

    res = asyncio.run(run())
    prot_us, plain_us = (min(res[k]) / n * 1e6 for k in ("protected", "plain"))
    floor = primitive_floor(payload_size)
    floor_total = floor.get("c_total", floor["total"])
    delta = prot_us - plain_us
    return {
        "messages_per_round": n, "rounds": rounds,
        "protected_put_us": round(prot_us, 3), "plain_put_us": round(plain_us, 3),
        "security_us": round(delta, 3), "floor_us": round(floor_total, 3),
        "glue_us": round(delta - floor_total, 3),
    }


def primitive_floor(payload_size: int) -> dict[str, float]:
    """What the C primitives alone cost per message (best of 7): AES-256-GCM of the payload,
    SHA-256 of the envelope + the leaf, one Merkle node, ML-DSA-65 sign / 1024."""
    import hashlib
    import timeit

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from rapidmq_edge.crypto.keys import GatewayIdentity

    aead, nonce, aad = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(70)
    payload, env, leaf_in = os.urandom(payload_size), os.urandom(payload_size + 35), os.urandom(80)
    node = os.urandom(65)
    ident = GatewayIdentity.generate()
    sha = hashlib.sha256

    def best(fn: Any, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6

    parts = {
        "aes_gcm": best(lambda: aead.encrypt(nonce, payload, aad), 20000),
        "sha256_envelope_and_leaf": best(lambda: sha(leaf_in + sha(env).digest()).digest(), 20000),
        "merkle_node": best(lambda: sha(node).digest(), 20000),
        "mldsa65_sign_per_1024": best(lambda: ident.sign(b"x" * 100), 20) / 1024,
    }
    parts["total"] = sum(parts.values())
    from rapidmq_edge.crypto import accel

    if accel.FASTPATH is not None:  # the same work through crypto/_fastpath.c
        fast = accel.FASTPATH.GcmSealer(os.urandom(32), nonce, b"\x87\x01\x03\x48" + bytes(8),
                                        b"\x83\x40\xa2\x04\x48" + bytes(8) + b"\x06")
        leaves = os.urandom(32 * 1024)
        tg, mid = b"\x78\x30" + b"t" * 48 + b"\x68gw-bench", b"\x6egw-bench:12345"
        parts["c_seal_and_leaf"] = best(lambda: fast.seal(12345, payload, tg, mid, leaf_in), 20000)
        parts["c_merkle_per_leaf"] = best(lambda: accel.merkle_root(leaves), 20) / 1024
        parts["c_total"] = (parts["c_seal_and_leaf"] + parts["c_merkle_per_leaf"]
                            + parts["mldsa65_sign_per_1024"])
    return {k: round(v, 3) for k, v in parts.items()}


def envelope_before_after(payload_size: int, n: int = 20000) -> dict[str, float]:
    """Per-message seal + leaf: the original composition (generic CBOR ``message_aad`` /
    ``encode_envelope`` / ``SealedMessage`` / ``message_leaf``, still in the package) vs the
    fast path the gateway uses (``Sealer.seal_raw`` + fused leaf). Best of 5, same process."""
    import timeit

    from rapidmq_edge.crypto.batch import message_leaf
    from rapidmq_edge.crypto.batch_message import fast_leaf
    from rapidmq_edge.crypto.envelope import (
        SealedMessage,
        _piv,
        encode_envelope,
        message_aad,
        tstr,
    )
    from rapidmq_edge.crypto.keys import RecipientKey

    sealer = Sealer(RecipientKey.generate().public(), GW, max_messages=1 << 40)
    sealer.session_header  # noqa: B018 - start the session
    payload = os.urandom(payload_size)
    topic = f"{PREFIX}plant/line1/dev7/temp"
    keys, aead = sealer._keys, sealer._aead
    assert keys is not None and aead is not None
    seq = iter(range(10**9))

    def before() -> None:
        s = next(seq)
        mid = f"{GW}:{s}"
        piv = _piv(s)
        ct = aead.encrypt(keys.nonce(s), payload, message_aad(keys.session_id, piv, topic, GW, mid))
        m = SealedMessage(encode_envelope(keys.session_id, piv, ct), keys.session_id, s,
                          sealer.header, False)
        message_leaf(mid, topic, m.envelope)

    def after() -> None:
        mid = f"{GW}:{next(seq)}"
        mid_t = tstr(mid)
        env = sealer.seal_raw(payload, sealer.topic_tstr(topic), mid_t)
        fast_leaf(mid, topic, env)

    def best(fn: Any) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6

    b, a = best(before), best(after)
    return {"before_us": round(b, 3), "after_us": round(a, 3), "speedup": round(b / a, 2)}


def _gateway_render(data: Path, up_port: int, gw_id: str, keys: Path | None, batch: int) -> Any:
    def render(port: int) -> str:
        text = (
            f'[gateway]\nid = "{gw_id}"\ndata_dir = "{data}"\nlog_level = "warning"\n'
            f'[mqtt]\nlisten = ["tcp://127.0.0.1:{port}"]\nsys_interval = 1.0\n'
            "[auth]\nallow_anonymous = true\n"
            f'[[upstream]]\nname = "cloud"\nurls = ["mqtt://127.0.0.1:{up_port}"]\n'
            'keep_alive = 30\n[[forward]]\nfilter = "sensors/#"\nupstream = "cloud"\nqos = 1\n'
        )
        if keys is not None:
            text += "encrypt = true\nsign = true\n"
        text += '[queue]\ndurability = "fsync"\ncommit_delay_ms = 5.0\n'
        if keys is not None:
            text += f'[security]\nkeys_dir = "{keys}"\nbatch_size = {batch}\n'
        return text

    return render


def forwarding_throughput(messages: int, rounds: int, publishers: int = 4) -> dict[str, Any]:
    """End-to-end msg/s and gateway CPU per message, security on vs off, alternating."""
    try:
        from bench import store_forward as sf
    except ImportError:  # run as a script from bench/
        import store_forward as sf  # type: ignore[no-redef]

    tmp = Path(tempfile.mkdtemp(prefix="pqwire-fwd-"))
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    procs: list[Any] = []
    try:
        gw_keys, _cloud = _keys(tmp)
        up = sf.Proc(name="upstream", kind="mosquitto", workdir=tmp / "up", mosquitto_bin=mosq,
                     python=sys.executable, start_timeout=10.0, render=sf.upstream_conf(None))
        procs.append(up)
        if not up.start():
            return {"error": f"upstream: {up.error}"}
        entries = {}
        for label, keys in (("off", None), ("on", gw_keys.directory)):
            gid = f"bench-{label}"
            p = sf.Proc(name=f"gateway-{label}", kind="rapidmq", workdir=tmp / label,
                        mosquitto_bin=mosq, python=sys.executable, start_timeout=20.0,
                        render=_gateway_render(tmp / label / "data", up.port, gid, keys, 1024))
            procs.append(p)
            if not p.start():
                return {"error": f"gateway {label}: {p.error}"}
            entries[label] = (p, gid)
        ns = argparse.Namespace(timeout=120.0, idle_timeout=10.0, publishers=publishers,
                                window=100)
        for p, gid in entries.values():
            sf.warmup(p, up, f"edge/{gid}", ns)
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for r in range(rounds):
            for label in ("off", "on") if r % 2 == 0 else ("on", "off"):
                p, gid = entries[label]
                tag = f"r{r}{label}"
                c0 = p.cpu()
                res = sf.flow(p, up, f"edge/{gid}/sensors/{tag}/#", f"sensors/{tag}/t",
                              messages, ns)
                res["gateway_cpu_us_per_msg"] = round((p.cpu() - c0) / messages * 1e6, 2)
                runs[label].append(res)
        out: dict[str, Any] = {"messages_per_run": messages, "rounds": rounds,
                               "publishers": publishers}
        for label, rs in runs.items():
            rates = [x["msg_per_s"] for x in rs if x.get("msg_per_s")]
            out[label] = {
                "msg_per_s_runs": rates,
                "msg_per_s_median": round(statistics.median(rates), 1) if rates else None,
                "gateway_cpu_us_per_msg_runs": [x["gateway_cpu_us_per_msg"] for x in rs],
                "lost": sum(x.get("lost", 0) for x in rs),
            }
        on, off = out["on"]["msg_per_s_median"], out["off"]["msg_per_s_median"]
        if on and off:
            out["ratio_on_vs_off"] = round(on / off, 3)
            out["gateway_cpu_us_per_msg_delta"] = round(
                statistics.median(out["on"]["gateway_cpu_us_per_msg_runs"])
                - statistics.median(out["off"]["gateway_cpu_us_per_msg_runs"]), 2)
        out["target"] = {"ratio_on_vs_off": 0.8}
        return out
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
