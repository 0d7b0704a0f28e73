"""Trust anchors: the operator public keys a gateway accepts manifests from (``[ota] trust``).

Policy (docs/ota.md, "Trust and rotation"):

* Every signature block is looked at. A block by a kid that is not trusted is ignored (a
  manifest may carry signatures for other fleets or by a key being retired elsewhere). A block
  by a trusted kid must verify, with that key's algorithm; one that does not refuses the whole
  manifest (``bad-signature``): nothing valid is ever made of a partly forged envelope.
* Accepted when at least ``threshold`` (default 1) distinct trusted **ML-DSA-65** keys signed
  it. Ed25519 anchors are the classical half of a hybrid: their signatures never suffice on
  their own; with ``require_classical`` one valid trusted Ed25519 signature is needed too.
* Rotation: trust old and new, sign with both, then drop the old key from ``trust``; a
  compromised key is removed from ``trust`` (and the sequence number stays where it is).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..crypto import cose
from ..crypto.errors import MalformedError
from .manifest import ManifestRefused, SignatureBlock
from .operator_keys import ED25519_ALGS, OperatorPublicKey, parse_public_key

__all__ = ["TrustAnchors"]


class TrustAnchors:
    """Operator public keys by kid, and the acceptance policy (module docstring)."""

    def __init__(self, keys: Iterable[OperatorPublicKey], *, threshold: int = 1,
                 require_classical: bool = False) -> None:
        self.keys: dict[bytes, OperatorPublicKey] = {k.kid: k for k in keys}
        pq = sum(1 for k in self.keys.values() if not k.classical)
        if threshold < 1 or threshold > pq:
            raise ValueError(f"threshold {threshold} needs at least that many ML-DSA-65 "
                             f"trust anchors; there are {pq}")
        if require_classical and not any(k.classical for k in self.keys.values()):
            raise ValueError("require_classical needs an Ed25519 trust anchor")
        self.threshold = threshold
        self.require_classical = require_classical

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, threshold: int = 1,
                   require_classical: bool = False) -> TrustAnchors:
        """Load COSE_Key public key files (as ``ota keys init`` writes them); ValueError
        naming the file that is missing or not an operator public key."""
        keys = []
        for p in paths:
            try:
                keys.append(parse_public_key(Path(p).read_bytes()))
            except OSError as exc:
                raise ValueError(f"trust anchor {p}: {exc.strerror or exc}") from None
            except MalformedError as exc:
                raise ValueError(f"trust anchor {p}: {exc}") from None
        return cls(keys, threshold=threshold, require_classical=require_classical)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self.keys

    def verify(self, blocks: Sequence[SignatureBlock], signed: bytes) -> tuple[bytes, ...]:
        """The trusted kids whose signatures over ``signed`` (the SUIT digest bstr) verify;
        ManifestRefused bad-signature / unknown-key when the policy is not met."""
        pq: list[bytes] = []
        classical: list[bytes] = []
        for i, b in enumerate(blocks):
            key = self.keys.get(b.kid)
            if key is None:
                continue
            if b.alg != key.alg and not (key.classical and b.alg in ED25519_ALGS):
                raise ManifestRefused("bad-signature", f"signature {i} by {b.kid.hex()} uses "
                                      f"alg {cose.show(b.alg)}, the key is alg {key.alg}")
            if not key.verify(cose.sig_structure(b.protected, signed), b.signature):
                raise ManifestRefused("bad-signature",
                                      f"signature {i} by trusted key {b.kid.hex()} is invalid")
            (classical if key.classical else pq).append(b.kid)
        pq_ok = len(set(pq))
        if pq_ok < self.threshold:
            kids = ", ".join(b.kid.hex() for b in blocks)
            raise ManifestRefused("unknown-key", f"{pq_ok} trusted ML-DSA-65 signature(s), "
                                  f"{self.threshold} needed (signed by: {kids or 'nobody'})")
        if self.require_classical and not classical:
            raise ManifestRefused("unknown-key", "no trusted Ed25519 signature (required)")
        return tuple(dict.fromkeys(pq + classical))
