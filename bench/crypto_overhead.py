"""Per-message CPU and byte overhead of the post-quantum protection (issue 5). Prints JSON.

Measured side by side in one run: plain (no protection, the reference), session AEAD envelope
(Sealer/Opener), single-shot HPKE per message, Merkle batch signing at N = 1/64/256/1024 (sign
side and verify side, per message), and the two backends' ML-DSA-65 sign/verify.

Forwarding path (bench/crypto_forwarding.py): ``gateway_path`` = the gateway's real protected
put (``pipeline.protect.Protector``: envelope at enqueue, leaf, batch signing, chain rows in the
queue transaction) minus plain ``ForwardQueue.put``, process CPU per message (min of
``--cpu-rounds`` alternating runs each) and bytes per message at N = 1/64/256/1024 with the
default ``manifest = "auto"`` (and ``"leaves"`` at 1024), the same at 1024 with the C
accelerator vs pure Python (``RAPIDMQ_EDGE_PURE_PYTHON=1``), the cloud consumer's cost, the
primitives' floor and ``put_glue_at_N1024`` (event-loop thread: security = floor + glue);
``forwarding_throughput`` = devices -> gateway -> Mosquitto msg/s with ``encrypt = sign = true``
vs off, alternating runs.

    .venv/bin/python bench/crypto_overhead.py [--payload 256] [--messages 20000] [--quick]
        [--throughput-messages 20000] [--rounds 2] [--cpu-rounds 5] [--skip-throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rapidmq_edge.crypto.backend import available_backends, get_backend  # noqa: E402
from rapidmq_edge.crypto.batch import BatchBuilder, message_leaf, verify_batch  # noqa: E402
from rapidmq_edge.crypto.e2e import open_device_message, seal_for_recipient  # noqa: E402
from rapidmq_edge.crypto.envelope import Opener, Sealer  # noqa: E402
from rapidmq_edge.crypto.keys import (  # noqa: E402
    GatewayIdentity,
    RecipientKey,
    RecipientKeyring,
    VerifierKeyring,
)
from rapidmq_edge.crypto.merkle import MerkleTree  # noqa: E402

GW = "gw-bench"


def per_op_us(fn: Callable[[], object], n: int, repeat: int = 3) -> float:
    """Median over ``repeat`` runs of the mean µs per call."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return round(statistics.median(runs), 3)


def bench(payload_size: int, n: int) -> dict[str, object]:
    payload = os.urandom(payload_size)
    rec = RecipientKey.generate()
    ring = RecipientKeyring([rec])
    ident = GatewayIdentity.generate()
    vring = VerifierKeyring([ident.public()])
    topics = [f"plant/line{i % 8}/temp" for i in range(n)]
    mids = [f"{GW}:{i}" for i in range(n)]
    out: dict[str, object] = {}

    # reference: what forwarding does per message without protection (copy the payload)
    i = iter(range(10**9))
    out["plain"] = {"cpu_us": per_op_us(lambda: bytes(payload), n), "bytes": 0}

    # session AEAD: seal side and open side
    sealer = Sealer(rec.public(), GW, max_messages=1 << 30)
    sealed = []

    def seal() -> None:
        k = next(i) % n
        sealed.append(sealer.seal(payload, topic=topics[k], message_id=mids[k]))

    seal_us = per_op_us(seal, n)
    m0 = sealed[0]
    env_over = len(m0.envelope) - payload_size
    header_bytes = len(m0.session_header)
    opener = Opener(ring, replay_window=1 << 16)
    opener.add_session(m0.session_header)
    batch_open = sealed[:n]
    j = iter(range(10**9))

    def open_one() -> None:
        k = next(j)
        m = batch_open[k]
        opener.open(m.envelope, topic=topics[k % n], message_id=mids[k % n])

    open_us = per_op_us(open_one, n, repeat=1)
    session_setup_us = per_op_us(lambda: Sealer(rec.public(), GW).session_header, 200)
    out["session_aead"] = {
        "seal_cpu_us": seal_us,
        "open_cpu_us": open_us,
        "bytes": env_over,
        "session_header_bytes": header_bytes,
        "session_setup_us": session_setup_us,
        "note": "per-session header cost amortised over max_messages (default 1,048,576)",
    }

    # single-shot HPKE per message (device e2e)
    hn = max(200, n // 20)
    env = seal_for_recipient(rec.public(), payload, b"ctx")
    out["hpke_per_message"] = {
        "seal_cpu_us": per_op_us(lambda: seal_for_recipient(rec.public(), payload, b"ctx"), hn),
        "open_cpu_us": per_op_us(lambda: open_device_message(ring, env, b"ctx"), hn),
        "bytes": len(env) - payload_size,
    }

    # batch signing at several N: leaf hashing + tree + one signature, per message
    envs = [m.envelope for m in sealed]
    batches = {}
    for size in (1, 64, 256, 1024):
        rounds = max(3, min(40, 4096 // size))

        def sign_batch(size: int = size) -> bytes:
            b = BatchBuilder(ident, GW)
            for k in range(size):
                b.add(mids[k % n], topics[k % n], envs[k % n])
            sb = b.seal()
            assert sb is not None
            return sb.signed

        signed = sign_batch()
        leaves = [message_leaf(mids[k % n], topics[k % n], envs[k % n]) for k in range(size)]

        def verify(size: int = size, signed: bytes = signed) -> None:
            h = verify_batch(signed, vring)
            lv = [message_leaf(mids[k % n], topics[k % n], envs[k % n]) for k in range(size)]
            assert MerkleTree(lv).root == h.root

        assert MerkleTree(leaves).root
        batches[str(size)] = {
            "sign_cpu_us_per_msg": round(per_op_us(sign_batch, rounds) / size, 3),
            "verify_cpu_us_per_msg": round(per_op_us(verify, rounds) / size, 3),
            "bytes_per_msg": round(len(signed) / size, 2),
            "signed_header_bytes": len(signed),
        }
    out["batch_signing"] = batches

    # totals per message at N=1024 (session AEAD + batch signature)
    b1024 = batches["1024"]
    total_cpu = seal_us + float(b1024["sign_cpu_us_per_msg"]) - out["plain"]["cpu_us"]  # type: ignore[index]
    out["total_gateway_at_N1024"] = {
        "cpu_us": round(total_cpu, 3),
        "bytes": round(env_over + float(b1024["bytes_per_msg"]), 2),
        "target": {"cpu_us": 5.0, "bytes": 48},
    }

    # backends side by side
    seed = os.urandom(32)
    msg = os.urandom(64)
    backends = {}
    for name in available_backends():
        be = get_backend(name)
        signer = be.mldsa65_signer(seed)
        sig = signer.sign(msg)
        ver = be.mldsa65_verifier(signer.public_key)
        kem = be.mlkem768_decapsulator(os.urandom(64))
        ct, _ = be.mlkem768_encapsulate(kem.public_key)
        backends[name] = {
            "mldsa65_sign_us": per_op_us(
                lambda s=signer: s.sign(msg), 30 if name == "pqcrypto" else 300
            ),
            "mldsa65_verify_us": per_op_us(lambda v=ver, s=sig: v.verify(msg, s), 300),
            "mlkem768_encaps_us": per_op_us(
                lambda b=be, k=kem: b.mlkem768_encapsulate(k.public_key), 300
            ),
            "mlkem768_decaps_us": per_op_us(lambda k=kem, c=ct: k.decapsulate(c), 300),
        }
    if len(backends) == 2:
        c, p = backends["cryptography"], backends["pqcrypto"]
        backends["ratio_pqcrypto_over_cryptography"] = {k: round(p[k] / c[k], 2) for k in c}
    out["backends"] = backends
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--payload", type=int, default=256)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--quick", action="store_true", help="2,000 messages")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--throughput-messages", type=int,
                    help="per end-to-end run (20000; quick 5000)")
    ap.add_argument("--rounds", type=int, default=2, help="end-to-end runs per mode (2)")
    ap.add_argument("--cpu-rounds", type=int, default=5,
                    help="gateway CPU runs per mode and batch size, min taken (5)")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    n = 2000 if args.quick else args.messages
    load_before = os.getloadavg()
    result = bench(args.payload, n)
    from crypto_forwarding import forwarding_throughput, gateway_path

    result["gateway_path"] = gateway_path(args.payload, 4096 if args.quick else 16384,
                                          2 if args.quick else args.cpu_rounds)
    if not args.skip_throughput:
        result["forwarding_throughput"] = forwarding_throughput(
            args.throughput_messages or (5000 if args.quick else 20000), args.rounds)
    doc = {
        "benchmark": "crypto_overhead",
        "payload_bytes": args.payload,
        "messages": n,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "results": result,
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
