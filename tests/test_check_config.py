"""``check-config`` says "ok" only when ``run`` will start: it loads every file the
configuration names and reports every problem, one line each with its key; ``run`` refuses
the same problems up front (exit 2), and a listen address in use names its key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rapidmq_edge.config import ConfigErrors, parse_config

from .conftest import free_port


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rapidmq_edge", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(f'[gateway]\ndata_dir = "{tmp_path / "data"}"\n' + text)
    return path


@pytest.mark.parametrize("make", ["directory", "random bytes", "bad hash"])
def test_a_broken_users_file_is_caught_by_check_config_and_run(tmp_path: Path,
                                                                make: str) -> None:
    users = tmp_path / "users.toml"
    if make == "directory":
        users.mkdir()
    elif make == "random bytes":
        users.write_bytes(os.urandom(300) + b"\xff\xfe")
    else:
        users.write_text('[users.alice]\npassword = "$scrypt$ln=1$bad"\n')
    conf = _conf(tmp_path, f'[auth]\nallow_anonymous = false\nusers_file = "{users}"\n')
    res = _cli("check-config", str(conf))
    assert res.returncode == 2 and "ok" not in res.stdout, res.stdout
    assert res.stderr.startswith(f"error: auth.users_file: {users}"), res.stderr
    run = _cli("run", "--config", str(conf))
    assert run.returncode == 2 and f"error: auth.users_file: {users}" in run.stderr


def test_broken_tokens_file_and_oscore_context(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("[tokens.x]\nuser = 1\n")
    oscore = tmp_path / "oscore"
    (oscore / "dev1").mkdir(parents=True)
    (oscore / "dev1" / "secret.json").write_text("{not json")
    conf = _conf(tmp_path, (
        f'[http]\nlisten = ["http://127.0.0.1:{free_port()}"]\ntokens_file = "{tokens}"\n'
        f'[coap]\nlisten = ["udp://127.0.0.1:{free_port()}"]\noscore_dir = "{oscore}"\n'))
    res = _cli("check-config", str(conf))
    lines = res.stderr.splitlines()
    assert res.returncode == 2, res.stderr
    assert any(ln.startswith(f"error: http.tokens_file: {tokens}") for ln in lines), lines
    assert any(ln.startswith("error: coap.oscore_dir: context dev1:") for ln in lines), lines


def test_every_config_problem_is_reported(tmp_path: Path) -> None:
    conf = _conf(tmp_path, (
        '[mqtt]\nmax_qos = 3\nlisen = ["tcp://127.0.0.1:1"]\n'
        '[[upstream]]\nname = "a"\nurls = ["http://x"]\n'
        '[[forward]]\nfilter = "#"\nupstream = "nope"\n'
        '[queue]\ncommit_delay_ms = -1\n'))
    res = _cli("check-config", str(conf))
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        'error: mqtt.lisen: unknown key (did you mean "listen"?)',
        "error: mqtt.max_qos: must be an integer from 0 to 2, got 3",
        'error: upstream[0].urls[0]: must look like "mqtt://host:port" or '
        "\"mqtts://host:port\", got 'http://x'",
        "error: forward[0].upstream: no [[upstream]] named 'nope'",
        "error: queue.commit_delay_ms: must be a number from 0 to 1000, got -1",
    ], res.stderr


def test_one_problem_keeps_its_exception_several_are_listed(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        parse_config({"mqtt": {"max_qos": 9, "sys_interval": "x"}}, tmp_path)
    assert [p.key for p in info.value.problems] == ["mqtt.max_qos", "mqtt.sys_interval"]
    with pytest.raises(Exception) as one:
        parse_config({"mqtt": {"max_qos": 9}}, tmp_path)
    assert type(one.value).__name__ == "ConfigError" and one.value.key == "mqtt.max_qos"


def test_ok_means_it_loads(tmp_path: Path) -> None:
    from rapidmq_edge.security.users import add_user

    users = tmp_path / "users.toml"
    add_user(users, "alice", "secret")
    conf = _conf(tmp_path, f'[auth]\nallow_anonymous = false\nusers_file = "{users}"\n')
    res = _cli("check-config", str(conf))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_listen_address_in_use_names_the_key(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        conf = _conf(tmp_path, f'[mqtt]\nlisten = ["tcp://127.0.0.1:{free_port()}", '
                               f'"tcp://127.0.0.1:{port}"]\n')
        res = _cli("run", "--config", str(conf))
    finally:
        busy.close()
    assert res.returncode == 1
    assert f"cannot start: mqtt.listen[1] tcp://127.0.0.1:{port}: " in res.stderr, res.stderr


def test_log_file(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "gateway.log"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:  # the gateway fails to bind and exits: what it logged is in the file
        conf = _conf(tmp_path, f'[log]\nfile = "{log}"\nlevel = "debug"\n[mqtt]\nlisten = '
                               f'["tcp://127.0.0.1:{busy.getsockname()[1]}"]\n')
        res = _cli("run", "--config", str(conf))
    finally:
        busy.close()
    assert res.returncode == 1 and res.stderr == ""
    text = log.read_text()
    assert "ERROR rapidmq_edge: cannot start: mqtt.listen[0]" in text
