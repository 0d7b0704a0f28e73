"""Tokens' roles (``admin`` by default, ``read``: look, never publish) in the tokens file
and on the command line, and the dashboard's session table (expiry, logout)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rapidmq_edge.ingress.dashboard.sessions import Sessions
from rapidmq_edge.security.tokens import TokenDB, TokensFileError, add_token


def test_token_roles_in_the_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    add_token(path, "old", "alice")
    add_token(path, "viewer", "bob", role="read")
    text = path.read_text()
    assert text.count("role") == 1 and 'role = "read"' in text  # admin stays implicit
    db = TokenDB.load(path)
    roles = {t.name: (t.role, t.may_publish) for t in db.tokens()}
    assert roles == {"old": ("admin", True), "viewer": ("read", False)}
    with pytest.raises(ValueError, match="role"):
        add_token(path, "x", "bob", role="root")
    path.write_text(text.replace('role = "read"', 'role = "root"'))
    with pytest.raises(TokensFileError, match=r"tokens.viewer.role"):
        TokenDB.load(path)


def test_token_add_role_on_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "tokens.toml"
    run = subprocess.run([sys.executable, "-m", "rapidmq_edge", "token", "add", "viewer",
                          "--role", "read", "--tokens-file", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    token = run.stdout.strip()
    entry = TokenDB.load(path).lookup(token)
    assert entry is not None and entry.role == "read" and not entry.may_publish
    listed = subprocess.run([sys.executable, "-m", "rapidmq_edge", "token", "list",
                             "--tokens-file", str(path)], capture_output=True, text=True,
                            timeout=30)
    assert listed.stdout.split("\t")[-1].strip() == "read"


def test_sessions_expire_and_end() -> None:
    now = [1000.0]
    s = Sessions(ttl=60, clock=lambda: now[0])
    sid = s.create("viewer", "sha256:" + "0" * 64)
    assert len(sid) >= 40 and s.get(sid) is not None
    assert s.get("forged") is None and s.get(None) is None
    now[0] += 61
    assert s.get(sid) is None and len(s) == 0
    sid = s.create("viewer", "sha256:" + "0" * 64)
    s.end(sid)
    assert s.get(sid) is None
