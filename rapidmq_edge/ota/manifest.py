"""OTA manifests: a SUIT-shaped signed envelope (draft-ietf-suit-manifest), sans-I/O.

Wire format (CDDL-ish; docs/ota.md has the full description)::

    envelope  = #6.107({2: bstr .cbor auth, 3: bstr .cbor manifest})
    auth      = [bstr .cbor [-16, sha256(manifest bstr)], + bstr .cbor COSE_Sign1_Tagged]
                ; each COSE_Sign1: protected {1: alg, 4: kid}, unprotected {}, payload nil
                ; (detached), signature over Sig_structure(protected, digest bstr)
    manifest  = {1: 1, 2: sequence, 3: bstr .cbor common, -257: model}
    common    = {2: [[h'6d6f64656c' ("model"), component bstr]],
                 4: bstr .cbor [20, {1: vendor uuid, 2: class uuid,
                                     3: bstr .cbor [-16, payload sha256], 14: payload size,
                                     ? 21: uri}, 1, 15, 2, 15]}
    model     = {1: version, 2: gateway class, 3: min gateway version, 4: format,
                 5: inputs, 6: outputs, 7: chunk size, 8: [+ chunk sha256],
                 9: {1: [+ [+ float]], 2: [+ label]}, ? 10: gate, ? 11: encryption}

SUIT labels where they fit (envelope 2/3, manifest 1/2/3, common 2/4, override-parameters
20, vendor/class identifiers 1/2, image digest 3, image size 14, uri 21, conditions 1/2 with
report policy 15); ``-257`` is this project's private-use manifest element.

:func:`verify_envelope` checks, in this order, and raises :class:`ManifestRefused` with a stable
``reason``: too-large, malformed, bad-signature / unknown-key (:class:`.trust.TrustAnchors`),
malformed (manifest body, parsed only once authenticated), unknown-component, wrong-class,
gateway-too-old, oversize, bad-chunking, and against the accepted sequences rollback /
conflict. An equal sequence with the same manifest is a replay: returned with
``status == "duplicate"``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import cbor2

from ..crypto import cose
from ..crypto.errors import MalformedError, TamperedError

if TYPE_CHECKING:
    from ..crypto.keys import RecipientKey, RecipientKeyring, RecipientPublicKey
    from .trust import TrustAnchors

__all__ = [
    "COMPONENTS",
    "DEFAULT_MAX_ENVELOPE_BYTES",
    "Encryption",
    "Gate",
    "Manifest",
    "ManifestRefused",
    "Recipient",
    "SequenceCheck",
    "SignatureBlock",
    "TensorSpec",
    "Vectors",
    "build_manifest",
    "class_uuid",
    "decrypt_payload",
    "encode_manifest",
    "gateway_version_ok",
    "parse_envelope",
    "sign_envelope",
    "verify_envelope",
]

#: the model slots a gateway has (``rapidmq_edge.intelligence.models.CONTRACTS``)
COMPONENTS = ("priority", "anomaly", "threat")
DEFAULT_MAX_ENVELOPE_BYTES = 1 << 20
MAX_SIGNATURES = 8
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 512, 16 << 20

TAG_SUIT_ENVELOPE = 107
ENV_AUTH, ENV_MANIFEST = 2, 3
M_VERSION, M_SEQUENCE, M_COMMON = 1, 2, 3
M_MODEL = -257  # private use: the model element (see the module docstring)
C_COMPONENTS, C_SEQUENCE = 2, 4
DIR_OVERRIDE_PARAMETERS, COND_VENDOR, COND_CLASS, REPORT_POLICY = 20, 1, 2, 15
P_VENDOR, P_CLASS, P_DIGEST, P_SIZE, P_URI = 1, 2, 3, 14, 21
ALG_SHA256 = -16
ALG_A256GCM = 3
K_VERSION, K_CLASS, K_MIN_GW, K_FORMAT, K_INPUTS, K_OUTPUTS = 1, 2, 3, 4, 5, 6
K_CHUNK_SIZE, K_CHUNKS, K_VECTORS, K_GATE, K_ENCRYPTION = 7, 8, 9, 10, 11
COMPONENT_PREFIX = b"model"
#: SUIT vendor-id: UUID v5 of this DNS-style name; class-id = UUID v5(vendor-id, class name)
VENDOR_NAME = "rapidmq-edge.ota"
VENDOR_UUID = uuid.uuid5(uuid.NAMESPACE_DNS, VENDOR_NAME)
GATE_KEYS = ("min_messages", "min_seconds", "min_agreement", "max_shift", "max_cost_us")
_VERSION_RE = re.compile(r"\d+(\.\d+){0,3}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PAYLOAD_AAD = "rapidmq-edge ota payload v1"
_CEK_INFO = "rapidmq-edge ota cek v1"


class ManifestRefused(Exception):
    """A manifest is refused; ``reason`` is a short stable code (module docstring), ``detail``
    says what exactly."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, element type ("float32", "int64", ...), shape
    (None = any size, e.g. the batch axis)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Vectors:
    """Validation vectors: input rows and the label the model must give each."""

    inputs: tuple[tuple[float, ...], ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Gate:
    """Shadow thresholds the candidate must pass before promotion (None = the config's)."""

    min_messages: int | None = None
    min_seconds: float | None = None
    min_agreement: float | None = None
    max_shift: float | None = None
    max_cost_us: float | None = None


@dataclass(frozen=True)
class Recipient:
    """The content key wrapped for one gateway: HPKE-9 (X-Wing) ``enc`` and ciphertext."""

    kid: bytes
    enc: bytes
    wrapped_cek: bytes


@dataclass(frozen=True)
class Encryption:
    """The payload is AES-256-GCM(cek, nonce) of the model; ``plain_*`` describe the model."""

    nonce: bytes
    recipients: tuple[Recipient, ...]
    plain_digest: bytes
    plain_size: int
    alg: int = ALG_A256GCM


@dataclass(frozen=True)
class Manifest:
    """What a signed manifest says. ``payload_*``/``chunk_*`` describe the payload as shipped
    (the ciphertext when ``encryption`` is set). ``signers`` (kids whose signatures verified)
    and ``status`` ("new" / "duplicate") are set by :func:`verify_envelope`, not compared."""

    component: str
    sequence: int
    version: str
    payload_digest: bytes
    payload_size: int
    chunk_size: int
    chunk_digests: tuple[bytes, ...]
    gateway_class: str
    min_gateway_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vectors: Vectors
    uri: str | None = None
    model_format: str = "onnx"
    gate: Gate | None = None
    encryption: Encryption | None = None
    signers: tuple[bytes, ...] = field(default=(), compare=False)
    status: str = field(default="new", compare=False)

    @property
    def chunk_count(self) -> int:
        """Number of chunks."""
        return len(self.chunk_digests)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` in the shipped payload."""
        if not 0 <= index < self.chunk_count:
            raise IndexError(f"chunk {index} of {self.chunk_count}")
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.payload_size - offset)

    @property
    def manifest_sha256(self) -> bytes:
        """SHA-256 of the manifest bstr (what the signatures cover, via the SUIT digest)."""
        return hashlib.sha256(encode_manifest(self)).digest()


class SequenceCheck(Protocol):
    """The accepted sequences (:class:`.sequences.SequenceStore` satisfies it)."""

    def check(self, component: str, sequence: int, manifest_sha256: bytes) -> str:
        """"new" or "duplicate"; ManifestRefused rollback/conflict."""
        ...


@dataclass(frozen=True)
class SignatureBlock:
    """One parsed (not yet verified) COSE_Sign1 of the authentication wrapper."""

    alg: int
    kid: bytes
    protected: bytes
    signature: bytes


# ----------------------------------------------------------------------------- encoding


def class_uuid(gateway_class: str) -> bytes:
    """SUIT class-id: UUID v5(vendor-id, gateway class), 16 bytes."""
    return uuid.uuid5(VENDOR_UUID, gateway_class).bytes


def _digest(data: bytes) -> bytes:
    return cose.dumps([ALG_SHA256, hashlib.sha256(data).digest()])


def _tensor(t: TensorSpec) -> list[Any]:
    return [t.name, t.dtype, list(t.shape)]


def _gate(g: Gate) -> dict[str, Any]:
    values = {k: getattr(g, k) for k in GATE_KEYS if getattr(g, k) is not None}
    return {k: int(v) if k == "min_messages" else float(v) for k, v in values.items()}


def _encryption(e: Encryption) -> dict[int, Any]:
    return {1: e.alg, 2: e.nonce, 3: [[r.kid, r.enc, r.wrapped_cek] for r in e.recipients],
            4: e.plain_digest, 5: e.plain_size}


def encode_manifest(m: Manifest) -> bytes:
    """The manifest bstr content (deterministic CBOR): equal manifests, equal bytes."""
    params: dict[int, Any] = {
        P_VENDOR: VENDOR_UUID.bytes, P_CLASS: class_uuid(m.gateway_class),
        P_DIGEST: cose.dumps([ALG_SHA256, m.payload_digest]), P_SIZE: m.payload_size,
    }
    if m.uri is not None:
        params[P_URI] = m.uri
    shared = [DIR_OVERRIDE_PARAMETERS, params, COND_VENDOR, REPORT_POLICY,
              COND_CLASS, REPORT_POLICY]
    common = {C_COMPONENTS: [[COMPONENT_PREFIX, m.component.encode()]],
              C_SEQUENCE: cose.dumps(shared)}
    model: dict[int, Any] = {
        K_VERSION: m.version, K_CLASS: m.gateway_class, K_MIN_GW: m.min_gateway_version,
        K_FORMAT: m.model_format, K_INPUTS: [_tensor(t) for t in m.inputs],
        K_OUTPUTS: [_tensor(t) for t in m.outputs], K_CHUNK_SIZE: m.chunk_size,
        K_CHUNKS: list(m.chunk_digests),
        K_VECTORS: {1: [[float(x) for x in r] for r in m.vectors.inputs],
                    2: [int(x) for x in m.vectors.labels]},
    }
    if m.gate is not None:
        model[K_GATE] = _gate(m.gate)
    if m.encryption is not None:
        model[K_ENCRYPTION] = _encryption(m.encryption)
    return cose.dumps({M_VERSION: 1, M_SEQUENCE: m.sequence, M_COMMON: cose.dumps(common),
                       M_MODEL: model})


# ----------------------------------------------------------------------------- decoding


def _bad(detail: str) -> ManifestRefused:
    return ManifestRefused("malformed", detail)


def _get(m: Mapping[Any, Any], key: int, kind: type | tuple[type, ...], what: str) -> Any:
    value = m.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _bad(f"{what} missing or of the wrong type")
    return value


def _uint(m: Mapping[Any, Any], key: int, what: str) -> int:
    value = _get(m, key, int, what)
    if value < 0 or value >= 1 << 63:
        raise _bad(f"{what} out of range")
    return int(value)


def _text(m: Mapping[Any, Any], key: int, what: str, limit: int = 256) -> str:
    value = _get(m, key, str, what)
    if not value or len(value) > limit:
        raise _bad(f"{what} must be 1-{limit} characters")
    return str(value)


def _map(obj: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(obj, Mapping):
        raise _bad(f"{what}: expected a map")
    return obj


def _list(obj: Any, what: str, limit: int = 1 << 20) -> list[Any]:
    if not isinstance(obj, list) or len(obj) > limit:
        raise _bad(f"{what}: expected an array (at most {limit} items)")
    return obj


def _cbor(data: Any, what: str) -> Any:
    if not isinstance(data, bytes):
        raise _bad(f"{what}: expected a byte string")
    try:
        return cose.decode_strict(data, what)
    except MalformedError as exc:
        raise _bad(str(exc)) from None


def _sha256_of(obj: Any, what: str) -> bytes:
    arr = _list(_cbor(obj, what), what, 2)
    if len(arr) != 2 or arr[0] != ALG_SHA256 or not isinstance(arr[1], bytes) \
            or len(arr[1]) != 32:
        raise _bad(f"{what}: expected [-16 (SHA-256), 32-byte digest]")
    return bytes(arr[1])


def _tensors(obj: Any, what: str) -> tuple[TensorSpec, ...]:
    out = []
    for i, t in enumerate(_list(obj, what, 64)):
        t = _list(t, f"{what}[{i}]", 3)
        if len(t) != 3 or not isinstance(t[0], str) or not isinstance(t[1], str):
            raise _bad(f"{what}[{i}]: expected [name, dtype, shape]")
        dims = _list(t[2], f"{what}[{i}] shape", 8)
        if not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                   for d in dims):
            raise _bad(f"{what}[{i}] shape: dimensions must be sizes or null")
        out.append(TensorSpec(t[0], t[1], tuple(dims)))
    return tuple(out)


def _vectors(obj: Any) -> Vectors:
    v = _map(obj, "vectors")
    rows = _list(v.get(1), "vectors inputs", 1024)
    labels = _list(v.get(2), "vectors labels", 1024)
    inputs = []
    for i, row in enumerate(rows):
        row = _list(row, f"vectors inputs[{i}]", 4096)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                   for x in row):
            raise _bad(f"vectors inputs[{i}]: expected finite numbers")
        inputs.append(tuple(float(x) for x in row))
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in labels) \
            or len(labels) != len(inputs):
        raise _bad("vectors labels: expected one integer label per input row")
    return Vectors(tuple(inputs), tuple(labels))


def _gate_from(obj: Any) -> Gate:
    g = _map(obj, "gate")
    values: dict[str, Any] = {}
    for key, value in g.items():
        if key not in GATE_KEYS:
            raise _bad(f"gate: unknown threshold {cose.show(key)}")
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value) or value < 0:
            raise _bad(f"gate {key}: expected a non-negative number")
        values[key] = int(value) if key == "min_messages" else float(value)
    return Gate(**values)


def _encryption_from(obj: Any) -> Encryption:
    e = _map(obj, "encryption")
    if e.get(1) != ALG_A256GCM:
        raise _bad(f"encryption: alg {cose.show(e.get(1))} is not A256GCM (3)")
    nonce = _get(e, 2, bytes, "encryption nonce")
    if len(nonce) != 12:
        raise _bad("encryption nonce: expected 12 bytes")
    recipients = []
    for i, r in enumerate(_list(e.get(3), "encryption recipients", 4096)):
        r = _list(r, f"encryption recipients[{i}]", 3)
        if len(r) != 3 or not all(isinstance(x, bytes) for x in r):
            raise _bad(f"encryption recipients[{i}]: expected [kid, enc, wrapped cek]")
        recipients.append(Recipient(r[0], r[1], r[2]))
    if not recipients:
        raise _bad("encryption: no recipients")
    digest = _get(e, 4, bytes, "encryption plain digest")
    if len(digest) != 32:
        raise _bad("encryption plain digest: expected 32 bytes")
    return Encryption(nonce, tuple(recipients), digest, _uint(e, 5, "encryption plain size"))


def decode_manifest(data: bytes) -> Manifest:
    """The manifest bstr content back into a :class:`Manifest`; ManifestRefused malformed."""
    m = _map(_cbor(data, "manifest"), "manifest")
    if set(m) - {M_VERSION, M_SEQUENCE, M_COMMON, M_MODEL}:
        raise _bad(f"manifest: unknown elements {sorted(map(cose.show, m))}")
    if m.get(M_VERSION) != 1:
        raise _bad(f"manifest version {cose.show(m.get(M_VERSION))} is not 1")
    sequence = _uint(m, M_SEQUENCE, "sequence number")
    common = _map(_cbor(m.get(M_COMMON), "common"), "common")
    comps = _list(common.get(C_COMPONENTS), "components", 1)
    comp = _list(comps[0] if comps else None, "component identifier", 2)
    if len(comp) != 2 or comp[0] != COMPONENT_PREFIX or not isinstance(comp[1], bytes):
        raise _bad("components: expected exactly [['model', component name]]")
    try:
        component = comp[1].decode()
    except UnicodeDecodeError:
        raise _bad("component name is not UTF-8") from None
    shared = _list(_cbor(common.get(C_SEQUENCE), "common sequence"), "common sequence", 16)
    if len(shared) != 6 or shared[0] != DIR_OVERRIDE_PARAMETERS or shared[2:] != [
            COND_VENDOR, REPORT_POLICY, COND_CLASS, REPORT_POLICY]:
        raise _bad("common sequence: expected [20, parameters, 1, 15, 2, 15]")
    params = _map(shared[1], "parameters")
    if set(params) - {P_VENDOR, P_CLASS, P_DIGEST, P_SIZE, P_URI}:
        raise _bad("parameters: unknown parameters")
    model = _map(m.get(M_MODEL), "model element")
    gateway_class = _text(model, K_CLASS, "gateway class", 64)
    if params.get(P_VENDOR) != VENDOR_UUID.bytes:
        raise _bad("vendor-id is not this project's")
    if params.get(P_CLASS) != class_uuid(gateway_class):
        raise _bad("class-id is not the UUID of the gateway class named in the manifest")
    uri = params.get(P_URI)
    if uri is not None and not (isinstance(uri, str) and uri.startswith(("http://",
                                                                           "https://"))):
        raise _bad("uri: expected an http(s):// URL")
    return Manifest(
        component=component,
        sequence=sequence,
        version=_text(model, K_VERSION, "version"),
        payload_digest=_sha256_of(params.get(P_DIGEST), "image digest"),
        payload_size=_uint(params, P_SIZE, "image size"),
        chunk_size=_uint(model, K_CHUNK_SIZE, "chunk size"),
        chunk_digests=tuple(_list(model.get(K_CHUNKS), "chunk digests")),
        gateway_class=gateway_class,
        min_gateway_version=_text(model, K_MIN_GW, "min gateway version", 32),
        inputs=_tensors(model.get(K_INPUTS), "inputs"),
        outputs=_tensors(model.get(K_OUTPUTS), "outputs"),
        vectors=_vectors(model.get(K_VECTORS)),
        uri=uri,
        model_format=_text(model, K_FORMAT, "model format", 32),
        gate=_gate_from(model[K_GATE]) if K_GATE in model else None,
        encryption=_encryption_from(model[K_ENCRYPTION]) if K_ENCRYPTION in model else None,
    )


# ----------------------------------------------------------------------------- building


def _chunks(payload: bytes, chunk_size: int) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(payload[i:i + chunk_size]).digest()
                 for i in range(0, len(payload), chunk_size))


def _encrypt(component: str, sequence: int, plain: bytes,
             recipients: Sequence[RecipientPublicKey]) -> tuple[Encryption, bytes]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ..crypto.hpke_suite import hpke_seal

    cek, nonce = os.urandom(32), os.urandom(12)
    shipped = AESGCM(cek).encrypt(nonce, plain, cose.dumps([_PAYLOAD_AAD, component, sequence]))
    info = cose.dumps([_CEK_INFO, component, sequence, hashlib.sha256(shipped).digest()])
    wrapped = []
    for r in recipients:
        enc, ct = hpke_seal(r.hpke_public_key, cek, info)
        wrapped.append(Recipient(r.kid, enc, ct))
    return Encryption(nonce, tuple(wrapped), hashlib.sha256(plain).digest(), len(plain)), shipped


def build_manifest(*, component: str, sequence: int, version: str, payload: bytes,
                   gateway_class: str, min_gateway_version: str,
                   inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec],
                   vectors: Vectors, chunk_size: int = 16384, uri: str | None = None,
                   model_format: str = "onnx", gate: Gate | None = None,
                   encrypt_to: Sequence[RecipientPublicKey] = ()) -> tuple[Manifest, bytes]:
    """A manifest for the model bytes ``payload`` and the payload to ship with it (the model
    itself, or its AES-256-GCM ciphertext under a fresh key wrapped for each of
    ``encrypt_to``); ValueError on an argument the gateway would refuse."""
    if not _NAME_RE.fullmatch(component):
        raise ValueError(f"component {component!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not _NAME_RE.fullmatch(gateway_class):
        raise ValueError(f"gateway class {gateway_class!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
    if not _VERSION_RE.fullmatch(min_gateway_version):
        raise ValueError(f"min gateway version {min_gateway_version!r}: expected e.g. 0.1.0")
    if not 0 <= sequence < 1 << 63:
        raise ValueError("sequence must be from 0 to 2^63-1")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    if not payload:
        raise ValueError("empty payload")
    if uri is not None and not uri.startswith(("http://", "https://")):
        raise ValueError("uri must be an http(s):// URL")
    encryption = None
    shipped = payload
    if encrypt_to:
        encryption, shipped = _encrypt(component, sequence, payload, encrypt_to)
    m = Manifest(
        component=component, sequence=sequence, version=version,
        payload_digest=hashlib.sha256(shipped).digest(), payload_size=len(shipped),
        chunk_size=chunk_size, chunk_digests=_chunks(shipped, chunk_size),
        gateway_class=gateway_class, min_gateway_version=min_gateway_version,
        inputs=tuple(inputs), outputs=tuple(outputs), vectors=vectors, uri=uri,
        model_format=model_format, gate=gate, encryption=encryption)
    decoded = decode_manifest(encode_manifest(m))  # what we build must parse (limits, types)
    return decoded, shipped


# ----------------------------------------------------------------------------- signing


class _Signer(Protocol):
    alg: int
    kid: bytes

    def sign(self, message: bytes) -> bytes: ...


def sign_envelope(manifest: Manifest | bytes, signers: Sequence[_Signer]) -> bytes:
    """The tagged SUIT envelope of ``manifest`` (a :class:`Manifest` or its encoded bstr
    content) with one detached COSE_Sign1 per signer (:class:`.operator_keys.OperatorSigner`:
    ML-DSA-65 alg -49, Ed25519 alg -19)."""
    if not signers:
        raise ValueError("at least one signer is needed")
    body = manifest if isinstance(manifest, bytes) else encode_manifest(manifest)
    digest = _digest(body)
    blocks = []
    for s in signers:
        protected = cose.dumps({cose.HDR_ALG: s.alg, cose.HDR_KID: s.kid})
        signature = s.sign(cose.sig_structure(protected, digest))
        blocks.append(cose.dumps(cbor2.CBORTag(cose.TAG_COSE_SIGN1,
                                               [protected, {}, None, signature])))
    auth = cose.dumps([digest, *blocks])
    return cose.dumps(cbor2.CBORTag(TAG_SUIT_ENVELOPE, {ENV_AUTH: auth, ENV_MANIFEST: body}))


def _signature_block(data: Any, i: int) -> SignatureBlock:
    what = f"signature {i}"
    try:
        obj = cose.decode_strict(data, what) if isinstance(data, bytes) else None
        if obj is None:
            raise MalformedError(f"{what}: expected a byte string")
        arr = cose.as_array(cose.untag(obj, cose.TAG_COSE_SIGN1, what), 4, what)
        if not isinstance(obj, cbor2.CBORTag):
            raise MalformedError(f"{what}: expected COSE_Sign1_Tagged (18)")
        protected = cose.as_bytes(arr[0], f"{what} protected")
        hdr = cose.as_map(cose.decode_strict(protected, f"{what} protected"), "protected")
        cose.as_map(arr[1], f"{what} unprotected")
        if arr[2] is not None:
            raise MalformedError(f"{what}: payload must be detached (nil)")
        alg = hdr.get(cose.HDR_ALG)
        if not isinstance(alg, int) or isinstance(alg, bool):
            raise MalformedError(f"{what}: alg missing")
        kid = cose.as_bytes(hdr.get(cose.HDR_KID), f"{what} kid")
        return SignatureBlock(alg, kid, protected, cose.as_bytes(arr[3], f"{what} signature"))
    except MalformedError as exc:
        raise _bad(str(exc)) from None


def parse_envelope(data: bytes, max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
                   ) -> tuple[bytes, bytes, tuple[SignatureBlock, ...]]:
    """Split an envelope, verifying nothing: ``(manifest bstr content, signed digest bstr,
    signature blocks)``; ManifestRefused too-large / malformed / bad-signature (the digest in
    the authentication wrapper is not the manifest's)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _bad(f"envelope: expected bytes, got {type(data).__name__}")
    if len(data) > max_envelope_bytes:
        raise ManifestRefused("too-large",
                              f"envelope of {len(data)} bytes, limit {max_envelope_bytes}")
    env = _cbor(bytes(data), "envelope")
    if not isinstance(env, cbor2.CBORTag) or env.tag != TAG_SUIT_ENVELOPE:
        raise _bad("envelope: expected SUIT_Envelope_Tagged (CBOR tag 107)")
    env_map = _map(env.value, "envelope")
    if set(env_map) != {ENV_AUTH, ENV_MANIFEST}:
        raise _bad("envelope: expected exactly the elements 2 (authentication) and 3 (manifest)")
    body = env_map[ENV_MANIFEST]
    if not isinstance(body, bytes):
        raise _bad("manifest: expected a byte string")
    auth = _list(_cbor(env_map[ENV_AUTH], "authentication wrapper"), "authentication wrapper",
                 1 + MAX_SIGNATURES)
    if len(auth) < 2:
        raise _bad(f"authentication wrapper: expected a digest and 1-{MAX_SIGNATURES} "
                   "signatures")
    digest = auth[0]
    if _sha256_of(digest, "manifest digest") != hashlib.sha256(body).digest():
        raise ManifestRefused("bad-signature", "the manifest digest in the authentication "
                              "wrapper is not the manifest's")
    return body, digest, tuple(_signature_block(b, i) for i, b in enumerate(auth[1:]))


# ----------------------------------------------------------------------------- verifying


def _version_tuple(v: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+(?:\.\d+){0,3})", v)
    if m is None:
        return None
    parts = tuple(int(x) for x in m.group(1).split("."))
    return parts + (0,) * (4 - len(parts))


def gateway_version_ok(gateway_version: str, minimum: str) -> bool:
    """True if ``gateway_version`` (e.g. "0.1.0", "1.2.0rc1" counts as 1.2.0) >= ``minimum``."""
    have, need = _version_tuple(gateway_version), _version_tuple(minimum)
    return have is not None and need is not None and have >= need


def _check_chunking(m: Manifest) -> None:
    if not MIN_CHUNK_SIZE <= m.chunk_size <= MAX_CHUNK_SIZE:
        raise ManifestRefused("bad-chunking", f"chunk size {m.chunk_size} is not from "
                              f"{MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    if m.payload_size == 0:
        raise ManifestRefused("bad-chunking", "payload size 0")
    want = -(-m.payload_size // m.chunk_size)
    if len(m.chunk_digests) != want:
        raise ManifestRefused("bad-chunking", f"{len(m.chunk_digests)} chunk digests for "
                              f"{m.payload_size} bytes in chunks of {m.chunk_size} "
                              f"({want} expected)")
    if not all(isinstance(d, bytes) and len(d) == 32 for d in m.chunk_digests):
        raise ManifestRefused("bad-chunking", "chunk digests must be 32-byte SHA-256 values")
    if len(m.chunk_digests) == 1 and m.chunk_digests[0] != m.payload_digest:
        raise ManifestRefused("bad-chunking", "a single chunk's digest is not the payload's")


def verify_envelope(data: bytes, trust: TrustAnchors, *, gateway_class: str,
                    gateway_version: str, max_payload_bytes: int,
                    accepted: SequenceCheck | None = None,
                    components: Iterable[str] = COMPONENTS,
                    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES) -> Manifest:
    """The verified manifest of envelope ``data``, with ``status`` "new" or "duplicate"
    (the accepted one again); ManifestRefused (reason in the module docstring) otherwise.
    Nothing of the manifest body is looked at before a trusted signature covers it."""
    body, digest, blocks = parse_envelope(data, max_envelope_bytes)
    signers = trust.verify(blocks, digest)
    m = decode_manifest(body)
    if encode_manifest(m) != body:  # one manifest, one encoding: its sha256 identifies it
        raise _bad("manifest is not in this format's deterministic encoding")
    if m.component not in tuple(components):
        raise ManifestRefused("unknown-component",
                              f"{cose.show(m.component)} is not a model slot here")
    if m.gateway_class != gateway_class:
        raise ManifestRefused("wrong-class", f"manifest for class {cose.show(m.gateway_class)},"
                              f" this gateway is {gateway_class!r}")
    if not gateway_version_ok(gateway_version, m.min_gateway_version):
        raise ManifestRefused("gateway-too-old", f"needs gateway >= {m.min_gateway_version}, "
                              f"this is {gateway_version}")
    size = max(m.payload_size, m.encryption.plain_size if m.encryption else 0)
    if size > max_payload_bytes:
        raise ManifestRefused("oversize", f"payload of {size} bytes, limit {max_payload_bytes}")
    _check_chunking(m)
    status = "new"
    if accepted is not None:
        status = accepted.check(m.component, m.sequence, hashlib.sha256(body).digest())
    return replace(m, signers=signers, status=status)


# ----------------------------------------------------------------------------- decryption


def decrypt_payload(manifest: Manifest, payload: bytes,
                    recipient: RecipientKey | RecipientKeyring) -> bytes:
    """The model inside an encrypted ``payload`` (checked against the manifest's digests);
    ManifestRefused "not-encrypted", "payload-mismatch", "not-a-recipient", "bad-payload"."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from ..crypto.hpke_suite import hpke_open
    from ..crypto.keys import RecipientKey

    e = manifest.encryption
    if e is None:
        raise ManifestRefused("not-encrypted", "the manifest has no encryption element")
    digest = hashlib.sha256(payload).digest()
    if len(payload) != manifest.payload_size or digest != manifest.payload_digest:
        raise ManifestRefused("payload-mismatch", "payload digest or size is not the manifest's")
    keys = {recipient.kid: recipient} if isinstance(recipient, RecipientKey) else dict(recipient)
    mine = [(r, keys[r.kid]) for r in e.recipients if r.kid in keys]
    if not mine:
        raise ManifestRefused("not-a-recipient", "the content key is not wrapped for "
                              f"{', '.join(k.hex() for k in keys) or 'any key held here'}")
    info = cose.dumps([_CEK_INFO, manifest.component, manifest.sequence, digest])
    r, key = mine[0]
    try:
        cek = hpke_open(key.hpke_private_key, r.enc, r.wrapped_cek, info)
        plain = AESGCM(cek).decrypt(
            e.nonce, payload, cose.dumps([_PAYLOAD_AAD, manifest.component, manifest.sequence]))
    except (TamperedError, InvalidTag, ValueError) as exc:
        raise ManifestRefused("bad-payload", f"cannot decrypt: {exc or 'authentication failed'}"
                              ) from None
    if len(plain) != e.plain_size or hashlib.sha256(plain).digest() != e.plain_digest:
        raise ManifestRefused("bad-payload", "decrypted model digest or size is not the "
                              "manifest's")
    return plain
