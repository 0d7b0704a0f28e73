"""Key files: 0600, passphrases, PKCS#8, rotation keyrings, public key export/import."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from rapidmq_edge.crypto import keyfile
from rapidmq_edge.crypto.errors import KeyFileError, MalformedError, UnknownKeyError
from rapidmq_edge.crypto.keys import (
    GatewayIdentity,
    IdentityPublicKey,
    RecipientKey,
    RecipientPublicKey,
)
from rapidmq_edge.crypto.keystore import KeyStore


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_files_are_private_and_reload(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "keys")
    ident = ks.create_identity()
    rec = ks.create_recipient()
    assert mode(tmp_path / "keys") == 0o700
    assert ident.file and rec.file
    for name in (ident.file, rec.file, "keyring.json"):
        assert mode(tmp_path / "keys" / name) == 0o600
    assert (tmp_path / "keys" / ident.file).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert ks.identity().kid == ident.kid
    assert list(ks.recipient_keyring()) == [rec.kid]
    assert not ks.is_encrypted(ident)


def test_passphrase(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "keys")
    ident = ks.create_identity(b"correct horse")
    rec = ks.create_recipient(b"correct horse")
    assert ident.file and rec.file
    pem = (tmp_path / "keys" / ident.file).read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    seed_file = (tmp_path / "keys" / rec.file).read_bytes()
    assert ks.is_encrypted(ident) and ks.is_encrypted(rec)
    seed = ks.recipient_keyring(b"correct horse")[rec.kid].seed
    assert seed not in seed_file
    for bad in (None, b"wrong"):
        with pytest.raises(KeyFileError, match="passphrase"):
            ks.identity(bad)
        with pytest.raises(KeyFileError, match="passphrase"):
            ks.recipient_keyring(bad)
    assert ks.identity(b"correct horse").kid == ident.kid
    # a modified ciphertext is refused, not silently decrypted
    tampered = bytearray(seed_file)
    tampered[-3] ^= 1
    with pytest.raises(KeyFileError):
        keyfile.decode_seed_file(bytes(tampered), keyfile.ALG_XWING, b"correct horse")


def test_seed_file_format_for_mldsa_too() -> None:
    seed = bytes(range(32))
    plain = keyfile.decode_seed_file(
        keyfile.cose.dumps({"v": 1, "alg": "ML-DSA-65", "seed": seed}), keyfile.ALG_MLDSA65
    )
    assert plain == seed
    with pytest.raises(KeyFileError, match="not X-Wing"):
        keyfile.decode_seed_file(
            keyfile.encode_seed_file(keyfile.ALG_XWING, seed).replace(b"X-Wing", b"X-Wong"),
            keyfile.ALG_XWING,
        )
    with pytest.raises(KeyFileError, match="PKCS#8 file"):
        keyfile.decode_seed_file(
            keyfile.encode_seed_file(keyfile.ALG_MLDSA65, seed), keyfile.ALG_XWING
        )


def test_rotation_keeps_old_keys(tmp_path: Path) -> None:
    ks = KeyStore(tmp_path / "keys")
    first = ks.create_identity()
    second = ks.create_identity()
    infos = ks.keys("identity")
    assert [i.kid for i in infos] == [first.kid, second.kid]
    assert [i.active for i in infos] == [False, True]
    assert ks.identity().kid == second.kid
    assert ks.identity(kid=first.kid).kid == first.kid
    ring = ks.verifier_keyring()
    assert first.kid in ring and second.kid in ring
    r1 = ks.create_recipient()
    r2 = ks.create_recipient()
    assert set(ks.recipient_keyring()) == {r1.kid, r2.kid}
    assert ks.recipient_public().kid == r2.kid
    index = json.loads((tmp_path / "keys" / "keyring.json").read_text())
    assert index["identity"][0]["retired"] is not None


def test_public_export_import(tmp_path: Path) -> None:
    cloud = KeyStore(tmp_path / "cloud")
    gw = KeyStore(tmp_path / "gw")
    with pytest.raises(UnknownKeyError, match="import"):
        gw.recipient_public()
    rec = cloud.create_recipient()
    cose_key = cloud.public_cose("recipient")
    info = gw.import_recipient_public(cose_key)
    assert info.kid == rec.kid and info.file is None
    assert gw.recipient_public().kid == rec.kid
    assert gw.import_recipient_public(cose_key).kid == rec.kid  # idempotent
    # COSE_Key shape and checks
    ident = GatewayIdentity(bytes(range(32)))
    assert IdentityPublicKey.from_cose(ident.cose_public_key()).public_key == ident.public_key
    with pytest.raises(MalformedError, match="not HPKE-9"):
        RecipientPublicKey.from_cose(ident.cose_public_key())
    with pytest.raises(MalformedError, match="not ML-DSA-65"):
        IdentityPublicKey.from_cose(cose_key)
    swapped = keyfile.cose.akp_public_key(-49, b"\x00" * 8, ident.public_key)
    with pytest.raises(MalformedError, match="kid does not match"):
        IdentityPublicKey.from_cose(swapped)
    with_priv = keyfile.cose.dumps({1: 7, 2: b"k", 3: -49, -1: ident.public_key, -2: ident.seed})
    with pytest.raises(MalformedError, match="private"):
        IdentityPublicKey.from_cose(with_priv)
    assert RecipientKey(bytes(32)).public() == RecipientPublicKey(
        RecipientKey(bytes(32)).public_key
    )
