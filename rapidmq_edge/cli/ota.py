"""Command line of the operator side of OTA model updates: ``rapidmq-edge ota ...``.

* ``ota keys init --out DIR [--ed25519]``: a new operator key (ML-DSA-65; optionally also
  Ed25519): ``operator-mldsa65.key`` (secret, 0600) + ``operator-mldsa65.pub`` (COSE_Key),
  refusing to overwrite anything.
* ``ota sign --key SECRET [--key ...] --component C --sequence N --model FILE.onnx --class X
  --min-version V --out DIR``: ``<component>-<sequence>.manifest`` (the signed envelope) and
  ``<component>-<sequence>.payload``.
* ``ota inspect FILE [--trust PUB ...] [--json]``: what a manifest says (and, with
  ``--trust``, whether it verifies).
* ``ota publish --url URL --manifest F --payload F [--gateway ID ...]``: chunks and manifest
  onto the cluster, for the whole class or for named gateways.
* ``ota rollout --url URL --manifest F --payload F [--stages 1,10%,50%,100%]
  [--max-failure 0.2] [--stage-timeout S] [--state FILE]``: staged, halting at the error
  threshold; the same command resumes from ``--state``. Exit 0 done, 1 halted.
* ``ota status --url URL [--json]``: the fleet table from the gateways' retained reports.

Exit codes: 0 ok, 1 failure (refused manifest, bad key), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["handles", "register", "run"]

PASSPHRASE_ENV = "RAPIDMQ_KEY_PASSPHRASE"
MLDSA_FILE, ED25519_FILE = "operator-mldsa65", "operator-ed25519"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``ota`` to the top-level subparsers."""
    ota = sub.add_parser("ota", help="over-the-air model updates: operator keys, signing")
    osub = ota.add_subparsers(dest="ota_command", required=True, metavar="ACTION")
    keys = osub.add_parser("keys", help="operator signing keys")
    ksub = keys.add_subparsers(dest="ota_keys_command", required=True, metavar="ACTION")
    init = ksub.add_parser("init", help="create an operator key (never overwrites)")
    init.add_argument("--out", type=Path, required=True, metavar="DIR")
    init.add_argument("--ed25519", action="store_true",
                      help="also an Ed25519 key (classical half of a hybrid signature)")
    init.add_argument("--passphrase-file", type=Path, metavar="FILE",
                      help=f"encrypt the secret key (first line); default ${PASSPHRASE_ENV}")

    sign = osub.add_parser("sign", help="model + options -> signed manifest + payload")
    sign.add_argument("--key", type=Path, action="append", required=True, metavar="SECRET",
                      help="operator secret key file (repeat: e.g. old + new, or + Ed25519)")
    sign.add_argument("--passphrase-file", type=Path, metavar="FILE")
    sign.add_argument("--component", required=True, help="model slot: priority, anomaly, ...")
    sign.add_argument("--sequence", type=int, required=True, metavar="N",
                      help="must be higher than every earlier one of this component")
    sign.add_argument("--model", type=Path, required=True, metavar="FILE.onnx")
    sign.add_argument("--model-version", metavar="V",
                      help="default: 'version' of FILE.json beside the model, else N")
    sign.add_argument("--class", dest="gateway_class", required=True, metavar="X")
    sign.add_argument("--min-version", required=True, metavar="V",
                      help="lowest gateway version the model fits, e.g. 0.1.0")
    sign.add_argument("--chunk-size", type=int, default=16384, metavar="BYTES")
    sign.add_argument("--uri", metavar="URL", help="optional HTTP(S) source of the payload")
    sign.add_argument("--encrypt-to", type=Path, action="append", default=[],
                      metavar="RECIPIENT_PUB", help="gateway X-Wing public key (COSE_Key); "
                      "repeat for each gateway that may decrypt")
    sign.add_argument("--gate", action="append", default=[], metavar="K=V",
                      help="shadow threshold: min_messages, min_seconds, min_agreement, "
                      "max_shift, max_cost_us")
    sign.add_argument("--vectors", type=int, default=8, metavar="ROWS",
                      help="validation rows computed by running the model (default 8)")
    sign.add_argument("--out", type=Path, required=True, metavar="DIR")

    insp = osub.add_parser("inspect", help="show a manifest (and verify it with --trust)")
    insp.add_argument("file", type=Path, metavar="FILE")
    insp.add_argument("--trust", type=Path, action="append", default=[], metavar="PUB")
    insp.add_argument("--json", action="store_true", help="machine-readable")

    def cluster_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", action="append", required=True, metavar="URL",
                       help="mqtt://host:port of the cluster (repeat for more nodes)")
        p.add_argument("--prefix", default="rapidmq/ota")
        p.add_argument("--username")
        p.add_argument("--password-file", type=Path, metavar="FILE")
        p.add_argument("--mqtt-version", type=int, choices=(4, 5), default=5)

    pub = osub.add_parser("publish", help="put a signed update on the cluster")
    cluster_args(pub)
    pub.add_argument("--manifest", type=Path, required=True, metavar="FILE")
    pub.add_argument("--payload", type=Path, required=True, metavar="FILE")
    pub.add_argument("--gateway", action="append", default=[], metavar="ID",
                     help="only these gateways (default: every gateway of the class)")

    ro = osub.add_parser("rollout", help="roll a signed update out in stages")
    cluster_args(ro)
    ro.add_argument("--manifest", type=Path, required=True, metavar="FILE")
    ro.add_argument("--payload", type=Path, required=True, metavar="FILE")
    ro.add_argument("--stages", default="1,10%,50%,100%",
                    help="gateway counts or percentages, the last 100%% (default %(default)s)")
    ro.add_argument("--max-failure", type=float, default=0.2, metavar="FRACTION",
                    help="halt when more than this part of the targeted gateways failed")
    ro.add_argument("--stage-timeout", type=float, default=600.0, metavar="S")
    ro.add_argument("--state", type=Path, metavar="FILE",
                    help="where the rollout's progress is kept (default next to the manifest)")
    ro.add_argument("--gateway", action="append", default=None, metavar="ID",
                    help="roll out to these gateways only (default: all of the class)")

    st = osub.add_parser("status", help="the fleet's model states")
    cluster_args(st)
    st.add_argument("--wait", type=float, default=2.0, metavar="S")
    st.add_argument("--json", action="store_true", help="machine-readable")


def handles(command: str) -> bool:
    """True for the commands this module implements."""
    return command == "ota"


def _passphrase(path: Path | None) -> bytes | None:
    if path is not None:
        lines = path.read_text().splitlines()
        return lines[0].encode() if lines and lines[0] else None
    env = os.environ.get(PASSPHRASE_ENV)
    return env.encode() if env else None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite), fsynced, with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _keys_init(args: argparse.Namespace) -> int:
    from ..ota.operator_keys import (
        OperatorSigner,
        ed25519_secret_file,
        generate_mldsa_seed,
        mldsa_secret_file,
    )

    out = Path(args.out)
    names = [MLDSA_FILE] + ([ED25519_FILE] if args.ed25519 else [])
    existing = [str(out / f"{n}{ext}") for n in names for ext in (".key", ".pub")
                if (out / f"{n}{ext}").exists()]
    if existing:
        print(f"error: refusing to overwrite {', '.join(existing)}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    pw = _passphrase(args.passphrase_file)
    seed = generate_mldsa_seed()
    signer = OperatorSigner.mldsa65(seed)
    made = [(MLDSA_FILE, mldsa_secret_file(seed, pw), signer)]
    if args.ed25519:
        pem, raw = ed25519_secret_file(pw)
        made.append((ED25519_FILE, pem, OperatorSigner.ed25519(raw)))
    for name, secret, s in made:
        _write_new(out / f"{name}.key", secret, 0o600)
        _write_new(out / f"{name}.pub", s.public().cose(), 0o644)
        kind = "ML-DSA-65" if name == MLDSA_FILE else "Ed25519"
        print(f"created {kind} operator key {s.kid.hex()}: {out / (name + '.key')} (secret, "
              f"0600{', passphrase-encrypted' if pw else ''}), {out / (name + '.pub')} (trust "
              "anchor for [ota] trust)")
    return 0


def _gate(items: list[str]) -> Any:
    from ..ota.manifest import GATE_KEYS, Gate

    if not items:
        return None
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in GATE_KEYS:
            raise ValueError(f"--gate {item!r}: expected K=V with K one of {', '.join(GATE_KEYS)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--gate {item!r}: {value!r} is not a number") from None
        values[key] = int(number) if key == "min_messages" else number
    return Gate(**values)


def _model_version(args: argparse.Namespace) -> str:
    if args.model_version:
        return str(args.model_version)
    sidecar = Path(args.model).with_suffix(".json")
    try:
        version = json.loads(sidecar.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    return str(version) if version else str(args.sequence)


def _sign(args: argparse.Namespace) -> int:
    from ..crypto.keys import RecipientPublicKey
    from ..ota.manifest import build_manifest, sign_envelope
    from ..ota.operator_keys import ED25519_ALGS, load_signer
    from ..ota.signing import model_interface, model_vectors

    pw = _passphrase(args.passphrase_file)
    signers = [load_signer(Path(k).read_bytes(), pw) for k in args.key]
    if all(s.alg in ED25519_ALGS for s in signers):
        raise ValueError("an ML-DSA-65 operator key is required (--key); Ed25519 only adds to it")
    model = Path(args.model)
    inputs, outputs = model_interface(model)
    vectors = model_vectors(args.component, model, args.vectors)
    recipients = [RecipientPublicKey.from_cose(Path(p).read_bytes()) for p in args.encrypt_to]
    manifest, payload = build_manifest(
        component=args.component, sequence=args.sequence, version=_model_version(args),
        payload=model.read_bytes(), gateway_class=args.gateway_class,
        min_gateway_version=args.min_version, inputs=inputs, outputs=outputs, vectors=vectors,
        chunk_size=args.chunk_size, uri=args.uri, gate=_gate(args.gate),
        encrypt_to=recipients)
    envelope = sign_envelope(manifest, signers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{args.component}-{args.sequence}"
    man_path, pay_path = base.with_suffix(".manifest"), base.with_suffix(".payload")
    for path in (man_path, pay_path):
        if path.exists():
            raise ValueError(f"{path} exists; a signed sequence is never re-signed")
    _write_new(pay_path, payload, 0o644)
    _write_new(man_path, envelope, 0o644)
    print(f"signed {args.component} sequence {args.sequence} (version {manifest.version}) by "
          f"{', '.join(s.kid.hex() for s in signers)}: {man_path} ({len(envelope)} B), "
          f"{pay_path} ({len(payload)} B, {manifest.chunk_count} chunks"
          f"{', encrypted to ' + str(len(recipients)) if recipients else ''})")
    return 0


def _describe(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    from ..ota.manifest import ManifestRefused, decode_manifest, parse_envelope, verify_envelope
    from ..ota.trust import TrustAnchors

    data = Path(args.file).read_bytes()
    body, _, blocks = parse_envelope(data)
    m = decode_manifest(body)
    verdict = None
    if args.trust:
        try:
            anchors = TrustAnchors.from_files(args.trust)
            ok = verify_envelope(data, anchors, gateway_class=m.gateway_class,
                                 gateway_version=m.min_gateway_version,
                                 max_payload_bytes=1 << 62)
            verdict = f"verified: signed by trusted {', '.join(k.hex() for k in ok.signers)}"
        except ManifestRefused as exc:
            verdict = f"REFUSED {exc.reason}: {exc.detail}"
    enc = m.encryption
    info: dict[str, Any] = {
        "component": m.component, "sequence": m.sequence, "version": m.version,
        "gateway_class": m.gateway_class, "min_gateway_version": m.min_gateway_version,
        "model_format": m.model_format, "payload_sha256": m.payload_digest.hex(),
        "payload_size": m.payload_size, "chunk_size": m.chunk_size,
        "chunks": m.chunk_count, "uri": m.uri,
        "inputs": [[t.name, t.dtype, list(t.shape)] for t in m.inputs],
        "outputs": [[t.name, t.dtype, list(t.shape)] for t in m.outputs],
        "vectors": len(m.vectors.labels), "vector_labels": list(m.vectors.labels),
        "gate": None if m.gate is None else {k: v for k, v in vars(m.gate).items()
                                             if v is not None},
        "encryption": None if enc is None else {
            "alg": "A256GCM", "recipients": [r.kid.hex() for r in enc.recipients],
            "plain_sha256": enc.plain_digest.hex(), "plain_size": enc.plain_size},
        "manifest_sha256": m.manifest_sha256.hex(),
        "signatures": [{"alg": b.alg, "kid": b.kid.hex()} for b in blocks],
        "envelope_bytes": len(data),
        "verified": verdict,
    }
    return info, verdict


def _inspect(args: argparse.Namespace) -> int:
    info, verdict = _describe(args)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            if key == "verified" and value is None:
                value = "not checked (give --trust PUB)"
            shown = value if isinstance(value, str | int) or value is None else json.dumps(value)
            print(f"{key:{width}}  {shown}")
    return 1 if verdict is not None and verdict.startswith("REFUSED") else 0


def _cluster_command(args: argparse.Namespace) -> int:
    import asyncio

    from ..ota.operator import Cluster, fleet_view, publish_signed, run_rollout
    from ..ota.rollout import parse_stages

    password = (args.password_file.read_text().strip() if args.password_file else None)
    cluster = Cluster(args.url, args.prefix, args.username, password, args.mqtt_version)
    if args.ota_command == "publish":
        out = asyncio.run(publish_signed(cluster, args.manifest, args.payload, args.gateway))
        print(json.dumps(out))
        return 0
    if args.ota_command == "rollout":
        state = args.state or args.manifest.with_suffix(".rollout.json")
        res = asyncio.run(run_rollout(
            cluster, args.manifest, args.payload, state, stages=parse_stages(args.stages),
            max_failure=args.max_failure, stage_timeout=args.stage_timeout,
            fleet=args.gateway, on_step=lambda line: print(line, flush=True)))
        return 1 if res.get("halted") else 0
    view = asyncio.run(fleet_view(cluster, args.wait))
    rows = view.table()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ("gateway", "online", "component", "state", "sequence", "active_sequence",
            "active_version", "progress", "agreement", "reason")
    cells = [[("" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``ota`` command."""
    from ..crypto.errors import CryptoError
    from ..ota.manifest import ManifestRefused

    try:
        if args.ota_command == "keys":
            return _keys_init(args)
        if args.ota_command == "sign":
            return _sign(args)
        if args.ota_command in ("publish", "rollout", "status"):
            return _cluster_command(args)
        return _inspect(args)
    except ManifestRefused as exc:
        print(f"error: manifest refused: {exc}", file=sys.stderr)
        return 1
    except (CryptoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("error: the cluster did not acknowledge in time", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
