"""Key files on disk: ``data_dir/keys`` (directory 0700, private files 0600, written atomically).

Layout::

    keys/keyring.json                      index: kind -> [{kid, file, public, created, retired}]
    keys/identity-<kid>.pem                gateway ML-DSA-65 seed, PKCS#8 (encrypted if passphrase)
    keys/identity-<kid>.cose               its public COSE_Key (AKP, alg -49)
    keys/recipient-<kid>.seed              cloud X-Wing seed, CBOR seed file (see keyfile.py)
    keys/recipient-<kid>.cose              its public COSE_Key (AKP, alg 56 = HPKE-9)
    keys/recipient-public-<kid>.cose       a cloud recipient public key imported on a gateway

Rotation appends a new key and marks the previous active one ``retired`` (time); retired keys stay
so that older batches still verify and older sessions still open. The newest unretired key of a
kind is the active one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import keyfile
from .backend import PQBackend
from .errors import KeyFileError, MalformedError, UnknownKeyError
from .keys import (
    GatewayIdentity,
    IdentityPublicKey,
    RecipientKey,
    RecipientKeyring,
    RecipientPublicKey,
    VerifierKeyring,
)

__all__ = ["KEY_KINDS", "KeyInfo", "KeyKind", "KeyStore"]

KeyKind = Literal["identity", "recipient", "recipient-public"]
KEY_KINDS: tuple[KeyKind, ...] = ("identity", "recipient", "recipient-public")
INDEX = "keyring.json"


@dataclass(frozen=True)
class KeyInfo:
    """One key in the index."""

    kind: KeyKind
    kid: bytes
    file: str | None  # private key file (None for imported public keys)
    public: str  # public COSE_Key file
    created: float
    retired: float | None

    @property
    def active(self) -> bool:
        """True while not retired."""
        return self.retired is None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class KeyStore:
    """The key directory of one gateway or cloud consumer."""

    def __init__(self, directory: Path, backend: PQBackend | None = None) -> None:
        self.directory = Path(directory)
        self.backend = backend

    # -- index --------------------------------------------------------------------------------

    def _load_index(self) -> dict[str, list[dict[str, object]]]:
        path = self.directory / INDEX
        if not path.exists():
            return {k: [] for k in KEY_KINDS}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"{path}: unreadable key index ({exc})") from None
        return {k: list(data.get(k, [])) for k in KEY_KINDS}

    def _save_index(self, index: dict[str, list[dict[str, object]]]) -> None:
        text = json.dumps({"v": 1, **index}, indent=1, sort_keys=True) + "\n"
        _write_atomic(self.directory / INDEX, text.encode(), 0o600)

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)

    def keys(self, kind: KeyKind) -> list[KeyInfo]:
        """All keys of ``kind``, oldest first."""
        out = []
        for e in self._load_index()[kind]:
            retired = e.get("retired")
            out.append(
                KeyInfo(
                    kind=kind,
                    kid=bytes.fromhex(str(e["kid"])),
                    file=str(e["file"]) if e.get("file") else None,
                    public=str(e["public"]),
                    created=float(e["created"]),  # type: ignore[arg-type]
                    retired=float(retired) if retired is not None else None,  # type: ignore[arg-type]
                )
            )
        return out

    def active(self, kind: KeyKind) -> KeyInfo:
        """The newest unretired key of ``kind``; UnknownKeyError if there is none."""
        live = [k for k in self.keys(kind) if k.active]
        if not live:
            raise UnknownKeyError(f"no active {kind} key in {self.directory} (run `keys init`)")
        return live[-1]

    def find(self, kind: KeyKind, kid: bytes | str | None = None) -> KeyInfo:
        """Key ``kid`` (bytes, or a hex prefix) of ``kind``, or the active one if None."""
        if kid is None:
            return self.active(kind)
        prefix = kid.hex() if isinstance(kid, bytes) else kid.lower()
        hits = [k for k in self.keys(kind) if k.kid.hex().startswith(prefix)]
        if len(hits) != 1:
            raise UnknownKeyError(f"{kind} kid {prefix!r} matches {len(hits)} keys")
        return hits[0]

    # -- creating -----------------------------------------------------------------------------

    def _add(
        self, kind: KeyKind, kid: bytes, private: bytes | None, ext: str, public_cose: bytes
    ) -> KeyInfo:
        self._ensure_dir()
        index = self._load_index()
        if any(e["kid"] == kid.hex() for e in index[kind]):
            raise KeyFileError(f"{kind} key {kid.hex()} already exists")
        name = f"{kind}-{kid.hex()}"
        file = None
        if private is not None:
            file = f"{name}.{ext}"
            _write_atomic(self.directory / file, private, 0o600)
        public = f"{name}.cose"
        _write_atomic(self.directory / public, public_cose, 0o644)
        now = time.time()
        for e in index[kind]:
            if e.get("retired") is None:
                e["retired"] = now
        index[kind].append(
            {"kid": kid.hex(), "file": file, "public": public, "created": now, "retired": None}
        )
        self._save_index(index)
        return self.find(kind, kid)

    def create_identity(
        self, passphrase: bytes | None = None, seed: bytes | None = None
    ) -> KeyInfo:
        """Generate (or import ``seed``) a gateway identity and make it the active one."""
        ident = (
            GatewayIdentity(seed, self.backend) if seed else GatewayIdentity.generate(self.backend)
        )
        blob = keyfile.encode_seed_file(keyfile.ALG_MLDSA65, ident.seed, passphrase)
        ext = "pem" if blob.startswith(b"-----") else "seed"
        return self._add("identity", ident.kid, blob, ext, ident.cose_public_key())

    def create_recipient(
        self, passphrase: bytes | None = None, seed: bytes | None = None
    ) -> KeyInfo:
        """Generate (or import ``seed``) a cloud X-Wing recipient key and make it active."""
        key = RecipientKey(seed) if seed else RecipientKey.generate()
        blob = keyfile.encode_seed_file(keyfile.ALG_XWING, key.seed, passphrase)
        return self._add("recipient", key.kid, blob, "seed", key.public().cose())

    def import_recipient_public(self, cose_key: bytes) -> KeyInfo:
        """Store a cloud recipient public key (COSE_Key) on a gateway; it becomes the active one."""
        key = RecipientPublicKey.from_cose(cose_key)
        for info in self.keys("recipient-public"):
            if info.kid == key.kid:
                return info
        return self._add("recipient-public", key.kid, None, "", key.cose())

    # -- loading ------------------------------------------------------------------------------

    def _read_private(self, info: KeyInfo) -> bytes:
        if info.file is None:
            raise KeyFileError(f"{info.kind} key {info.kid.hex()} has no private part here")
        path = self.directory / info.file
        try:
            return path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{path}: {exc.strerror or exc}") from None

    def is_encrypted(self, info: KeyInfo) -> bool:
        """True if the key's private file needs a passphrase."""
        return info.file is not None and keyfile.is_encrypted(self._read_private(info))

    def identity(
        self, passphrase: bytes | None = None, kid: bytes | None = None
    ) -> GatewayIdentity:
        """The gateway identity (the active one unless ``kid``) for signing."""
        info = self.find("identity", kid)
        seed = keyfile.decode_seed_file(self._read_private(info), keyfile.ALG_MLDSA65, passphrase)
        ident = GatewayIdentity(seed, self.backend)
        if ident.kid != info.kid:
            raise KeyFileError(f"{info.file}: key does not match its kid {info.kid.hex()}")
        return ident

    def public_cose(self, kind: KeyKind, kid: bytes | str | None = None) -> bytes:
        """The public COSE_Key bytes of a key (no passphrase needed)."""
        info = self.find(kind, kid)
        path = self.directory / info.public
        try:
            return path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{path}: {exc.strerror or exc}") from None

    def verifier_keyring(self) -> VerifierKeyring:
        """All identity public keys (active and retired) for verifying batch signatures."""
        ring = VerifierKeyring(backend=self.backend)
        for info in self.keys("identity"):
            try:
                ring.add(IdentityPublicKey.from_cose(self.public_cose("identity", info.kid)))
            except MalformedError as exc:
                raise KeyFileError(f"{info.public}: {exc}") from None
        return ring

    def recipient_keyring(self, passphrase: bytes | None = None) -> RecipientKeyring:
        """All recipient private keys (active and retired) for opening sessions."""
        ring = RecipientKeyring()
        for info in self.keys("recipient"):
            seed = keyfile.decode_seed_file(self._read_private(info), keyfile.ALG_XWING, passphrase)
            key = RecipientKey(seed)
            if key.kid != info.kid:
                raise KeyFileError(f"{info.file}: key does not match its kid {info.kid.hex()}")
            ring.add(key)
        return ring

    def recipient_public(self) -> RecipientPublicKey:
        """The key a gateway seals to: the newest imported one, else this store's own active one."""
        for kind in ("recipient-public", "recipient"):
            live = [k for k in self.keys(kind) if k.active]  # type: ignore[arg-type]
            if live:
                return RecipientPublicKey.from_cose(self.public_cose(kind, live[-1].kid))  # type: ignore[arg-type]
        raise UnknownKeyError(
            f"no recipient public key in {self.directory} (import one with `keys import-recipient`)"
        )
