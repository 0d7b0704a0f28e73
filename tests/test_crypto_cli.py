"""``rapidmq-edge keys ...`` and ``rapidmq-edge audit verify`` end to end (in-process main())."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from rapidmq_edge.cli import main
from rapidmq_edge.crypto.batchlog import BatchLog
from rapidmq_edge.crypto.keys import RecipientPublicKey
from rapidmq_edge.crypto.keystore import KeyStore


def test_keys_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    assert (
        main(["keys", "init", "--data-dir", str(data), "--recipient", "--passphrase-file", str(pw)])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("created") == 2 and "passphrase-encrypted" in out
    assert main(["keys", "show", "--data-dir", str(data)]) == 0
    show = capsys.readouterr().out
    assert "identity" in show and "0o600 encrypted" in show and "active" in show
    assert main(["keys", "init", "--data-dir", str(data)]) == 0
    assert "identity exists" in capsys.readouterr().out
    first = KeyStore(data / "keys").active("identity").kid
    assert (
        main(["keys", "rotate", "identity", "--data-dir", str(data), "--passphrase-file", str(pw)])
        == 0
    )
    assert f"kept {first.hex()}" in capsys.readouterr().out
    assert main(["keys", "show", "--data-dir", str(data)]) == 0
    assert "retired" in capsys.readouterr().out
    # export the recipient key and import it into a gateway's key dir
    cose_file = tmp_path / "rec.cose"
    assert (
        main(
            ["keys", "export-public", "recipient", "--data-dir", str(data), "--out", str(cose_file)]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        RecipientPublicKey.from_cose(cose_file.read_bytes()).kid
        == KeyStore(data / "keys").active("recipient").kid
    )
    gw = tmp_path / "gw"
    assert main(["keys", "import-recipient", str(cose_file), "--data-dir", str(gw)]) == 0
    assert "imported" in capsys.readouterr().out
    assert (
        main(["keys", "export-public", "identity", "--data-dir", str(data), "--format", "pem"]) == 0
    )
    assert capsys.readouterr().out.startswith("-----BEGIN PUBLIC KEY-----")
    assert (
        main(["keys", "export-public", "identity", "--data-dir", str(data), "--format", "raw"]) == 0
    )
    assert len(bytes.fromhex(capsys.readouterr().out.strip())) == 1952
    assert stat.S_IMODE((data / "keys").stat().st_mode) == 0o700


def test_audit_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert main(["keys", "init", "--data-dir", str(data)]) == 0
    ident = KeyStore(data / "keys").identity()
    chain = data / "audit" / "chain.sqlite"
    chain.parent.mkdir(parents=True)
    with BatchLog(chain, ident, "gw-1", batch_size=3) as log:
        log.add_many([(f"gw-1:{i}", "t", b"x") for i in range(12)])
    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(data)]) == 0
    assert "ok: 4 batches, 12 messages verified" in capsys.readouterr().out
    pub = tmp_path / "id.cose"
    pub.write_bytes(KeyStore(data / "keys").public_cose("identity"))
    db = sqlite3.connect(chain)
    db.execute(
        "UPDATE batches SET signed = (SELECT signed FROM batches WHERE pos = 1) WHERE pos = 2"
    )
    db.commit()
    db.close()
    assert main(["audit", "verify", "--chain", str(chain), "--public-key", str(pub)]) == 1
    out = capsys.readouterr().out
    assert "BROKEN at batch #2 (seq 1): repeated" in out and "2 batches before it verified" in out
    assert (
        main(
            ["audit", "verify", "--chain", str(tmp_path / "none.sqlite"), "--public-key", str(pub)]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no batch chain at ") and ": :" not in err, err
