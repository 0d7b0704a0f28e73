"""Tests for rapidmq_edge.cli (subprocess for the real entry point, in-process otherwise)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rapidmq_edge import cli
from rapidmq_edge.config import Config
from rapidmq_edge.security.users import UserDB

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "rapidmq_edge.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=60,
        start_new_session=True,  # no controlling terminal, as under CI, cron or a pipe
    )


def test_check_config_ok_and_error(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[gateway]\nid = "edge-9"\n')
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nlisen = ["tcp://127.0.0.1:1883"]\n')
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == 'error: mqtt.lisen: unknown key (did you mean "listen"?)'
    assert result.stdout == ""


def test_check_config_missing_file_and_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    public = tmp_path / "public.toml"
    public.write_text('[mqtt]\nlisten = ["tcp://0.0.0.0:1883"]\n')
    assert cli.main(["check-config", str(public)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "ok" and out.err.startswith("warning: auth.allow_anonymous")


def test_user_add_password_stdin(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    result = run_cli(
        "user", "add", "alice", "--users-file", str(users), "--password-stdin", stdin="s3cret\n"
    )
    assert result.returncode == 0, result.stderr
    assert "added user alice" in result.stdout
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    db = UserDB.load(users)
    assert db.authenticate("alice", b"s3cret")
    assert not db.authenticate("alice", b"s3cret\n")

    result = run_cli(
        "user", "add", "alice", "--users-file", str(users), "--password-stdin", stdin="\n"
    )
    assert result.returncode == 2 and "empty password" in result.stderr


def test_a_secret_piped_without_its_option_is_a_clear_error(tmp_path: Path) -> None:
    """Piping a password without --password-stdin (no terminal to ask on) says what to do,
    stores nothing and shows no traceback; the same for a key passphrase."""
    users = tmp_path / "users.toml"
    result = run_cli("user", "add", "alice", "--users-file", str(users), stdin="s3cret\n")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "error: no terminal to ask for the password on: pipe it to --password-stdin")
    assert not users.exists()
    result = run_cli("keys", "init", "--data-dir", str(tmp_path / "d"), "--ask-passphrase",
                     stdin="pw\n")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "no terminal to ask for the key passphrase on: give --passphrase-file" in result.stderr
    assert not (tmp_path / "d" / "keys").exists() or not any((tmp_path / "d" / "keys").iterdir())


def test_user_add_via_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text('[auth]\nusers_file = "secrets/users.toml"\nallow_anonymous = false\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw1\n"))
    assert cli.main(["user", "add", "bob", "--config", str(conf), "--password-stdin"]) == 0
    users = tmp_path / "secrets" / "users.toml"
    assert UserDB.load(users).authenticate("bob", b"pw1")

    monkeypatch.setattr(sys, "stdin", io.StringIO("pw2"))  # no trailing newline
    assert cli.main(["user", "add", "bob", "--config", str(conf), "--password-stdin"]) == 0
    assert "updated user bob" in capsys.readouterr().out
    assert UserDB.load(users).authenticate("bob", b"pw2")

    assert cli.main(["user", "list", "--config", str(conf)]) == 0
    assert capsys.readouterr().out == "bob\n"
    assert cli.main(["user", "remove", "bob", "--config", str(conf)]) == 0
    assert cli.main(["user", "remove", "bob", "--config", str(conf)]) == 1
    assert "no such user: bob" in capsys.readouterr().err
    assert cli.main(["user", "list", "--users-file", str(users)]) == 0
    assert capsys.readouterr().out == ""


def test_user_add_prompts_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.toml"
    answers = iter(["pw", "pw", "pw", "other", ""])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr("rapidmq_edge.cli.common.has_terminal", lambda: True)
    assert cli.main(["user", "add", "carol", "--users-file", str(users)]) == 0
    assert cli.main(["user", "add", "carol", "--users-file", str(users)]) == 2
    assert "do not match" in capsys.readouterr().err
    assert cli.main(["user", "add", "carol", "--users-file", str(users)]) == 2
    assert "empty password" in capsys.readouterr().err
    assert UserDB.load(users).authenticate("carol", b"pw")


def test_user_commands_need_a_users_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "edge.toml"
    conf.write_text("")
    assert cli.main(["user", "list", "--config", str(conf)]) == 2
    assert "auth.users_file: not set" in capsys.readouterr().err
    assert cli.main(["user", "list"]) == 2
    assert cli.main(["user", "list", "--users-file", str(tmp_path / "none.toml")]) == 2
    assert "users file not found" in capsys.readouterr().err
    corrupt = tmp_path / "bad.toml"
    corrupt.write_text("[users.x]\npassword = 1\n")
    assert cli.main(["user", "list", "--users-file", str(corrupt)]) == 2
    assert "users.x.password" in capsys.readouterr().err


def test_config_and_users_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["user", "list", "--config", "a", "--users-file", "b"])
    assert info.value.code == 2


def test_run_with_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt]\nmax_qos = 7\n")
    assert cli.main(["run", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: mqtt.max_qos: must be an integer")


def test_run_calls_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    # the command checks the configuration with gateway.preflight first: import the real
    # module before the package is replaced, so the outcome does not depend on what this
    # test worker happened to import before
    import rapidmq_edge.gateway.preflight  # noqa: F401

    seen: list[Config] = []

    def run_gateway(config: Config) -> int:
        seen.append(config)
        return 3

    fake = types.ModuleType("rapidmq_edge.gateway")
    fake.run_gateway = run_gateway  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rapidmq_edge.gateway", fake)
    conf = tmp_path / "edge.toml"
    conf.write_text('[gateway]\nid = "gw"\nlog_level = "warning"\n')
    assert cli.main(["run", "--config", str(conf)]) == 3
    assert seen[0].gateway.id == "gw"


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("rapidmq-edge ")
