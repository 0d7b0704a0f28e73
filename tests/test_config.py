"""Tests for rapidmq_edge.config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rapidmq_edge.config import (
    AclRule,
    Config,
    ConfigError,
    GatewaySettings,
    ListenerSettings,
    MqttSettings,
    load_config,
    parse_config,
    parse_listener,
)


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_embedded_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.source is None
    assert cfg.gateway == GatewaySettings("edge-1", Path("./data"), "info")
    assert [li.url for li in cfg.mqtt.listen] == ["tcp://127.0.0.1:1883"]
    assert cfg.mqtt.listen[0].host == "127.0.0.1" and cfg.mqtt.listen[0].port == 1883
    assert cfg.mqtt.max_packet_size == 1048576 and cfg.mqtt.max_qos == 2
    assert cfg.mqtt.tls is None
    assert cfg.auth.allow_anonymous and cfg.auth.users_file is None
    assert cfg.auth.acl_default == "allow"
    assert cfg.acl == ()
    assert cfg.persistence.durability == "fsync" and cfg.persistence.commit_delay_ms == 5.0
    assert cfg.warnings == ()


def test_empty_file_equals_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.mqtt == MqttSettings()
    assert cfg.source == (tmp_path / "edge.toml").resolve()


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        (tmp_path / "certs" / name).write_text("x")
    cfg = load_config(
        write(
            tmp_path,
            """
[gateway]
id = "plant-7.north"
data_dir = "state"
log_level = "debug"

[mqtt]
listen = ["tcp://0.0.0.0:1883", "tls://[::]:8883", "ws://127.0.0.1:0/ws"]
max_packet_size = 65536
receive_maximum = 20
max_qos = 1
sys_interval = 0
publish_rate = 2.5
connect_rate = 10

[mqtt.tls]
cert = "certs/server.crt"
key = "certs/server.key"
client_ca = "certs/ca.crt"
require_client_cert = true

[auth]
allow_anonymous = false
users_file = "users.toml"
acl_default = "deny"

[[acl]]
user = "*"
topic = "devices/%c/#"
access = "allow"

[[acl]]
user = "admin"
topic = "#"
action = "subscribe"
access = "allow"

[persistence]
durability = "normal"
commit_delay_ms = 0
""",
        )
    )
    assert cfg.gateway.id == "plant-7.north"
    assert cfg.gateway.data_dir == tmp_path / "state"
    assert cfg.mqtt.max_qos == 1 and cfg.mqtt.sys_interval == 0.0
    assert cfg.mqtt.publish_burst == 3  # max(1, ceil(2.5))
    assert cfg.mqtt.tls is not None
    assert cfg.mqtt.tls.cert == tmp_path / "certs" / "server.crt"
    assert cfg.mqtt.tls.client_ca == tmp_path / "certs" / "ca.crt"
    assert cfg.auth.users_file == tmp_path / "users.toml"
    assert cfg.acl == (
        AclRule("*", "devices/%c/#", "all", "allow"),
        AclRule("admin", "#", "subscribe", "allow"),
    )
    assert cfg.persistence.durability == "normal"
    assert [li.scheme for li in cfg.mqtt.listen] == ["tcp", "tls", "ws"]
    assert cfg.warnings == ()


def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: Any) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, '[gateway]\ndata_dir = "../var/data"\n[auth]\nusers_file = "u.toml"\n')
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(Path(path))
    assert cfg.gateway.data_dir == sub.resolve() / "../var/data"
    assert cfg.auth.users_file == sub.resolve() / "u.toml"
    absolute = load_config(write(sub, '[gateway]\ndata_dir = "/srv/edge"\n', "b.toml"))
    assert absolute.gateway.data_dir == Path("/srv/edge")


def test_parse_config_uses_base_dir(tmp_path: Path) -> None:
    cfg = parse_config({"gateway": {"data_dir": "d"}}, tmp_path)
    assert cfg.gateway.data_dir == tmp_path / "d"
    assert cfg.source is None


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path"),
    [
        ("tcp://127.0.0.1:1883", "tcp", "127.0.0.1", 1883, ""),
        ("tcp://127.0.0.1", "tcp", "127.0.0.1", 1883, ""),
        ("tls://0.0.0.0:8883", "tls", "0.0.0.0", 8883, ""),
        ("tls://example.org", "tls", "example.org", 8883, ""),
        ("ws://127.0.0.1:8083/mqtt", "ws", "127.0.0.1", 8083, "/mqtt"),
        ("ws://127.0.0.1", "ws", "127.0.0.1", 8083, "/mqtt"),
        ("ws://localhost:9001/a/b", "ws", "localhost", 9001, "/a/b"),
        ("wss://[::1]:8084", "wss", "::1", 8084, "/mqtt"),
        ("wss://[::1]", "wss", "::1", 8084, "/mqtt"),
        ("tcp://[::]:0", "tcp", "::", 0, ""),
        ("TCP://127.0.0.1:1883/", "tcp", "127.0.0.1", 1883, ""),
    ],
)
def test_parse_listener(url: str, scheme: str, host: str, port: int, path: str) -> None:
    li = parse_listener(url)
    assert (li.scheme, li.host, li.port, li.path) == (scheme, host, port, path)


def test_listener_url_is_normalised() -> None:
    assert parse_listener("wss://[::1]").url == "wss://[::1]:8084/mqtt"
    assert parse_listener("tcp://localhost").url == "tcp://localhost:1883"
    li = parse_listener("tls://[::1]:1")
    assert li == ListenerSettings("tls://[::1]:1", "tls", "::1", 1, "")
    assert li.is_tls and not li.is_websocket


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:1883",
        "mqtt://127.0.0.1:1883",
        "tcp://",
        "tcp://:1883",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:-1",
        "tcp://127.0.0.1:abc",
        "tcp://::1:1883",
        "tcp://[::1",
        "tcp://[::1]x",
        "tcp://[nothost]:1",
        "tcp://127.0.0.1:1883/path",
        "tcp://user@127.0.0.1:1883",
        "ws://127.0.0.1:8083/mqtt?x=1",
        "tcp://bad_host:1",
        "tcp://999.1.1.1:1",
    ],
)
def test_parse_listener_rejects(url: str) -> None:
    with pytest.raises(ConfigError, match=r"^mqtt\.listen: "):
        parse_listener(url)


# (TOML text, expected message prefix: the dotted key)
BAD: list[tuple[str, str]] = [
    ('gatway = {id = "x"}', 'gatway: unknown key (did you mean "gateway"?)'),
    ("[gateway]\nid = 5", "gateway.id: must be"),
    ('[gateway]\nid = "has space"', "gateway.id: must be"),
    (f'[gateway]\nid = "{"x" * 65}"', "gateway.id: must be"),
    ('[gateway]\nlog_level = "verbose"', "gateway.log_level: must be one of"),
    ("[gateway]\ndata_dir = 3", "gateway.data_dir: must be a non-empty path"),
    ('[gateway]\ndata_dir = ""', "gateway.data_dir: must be a non-empty path"),
    ('gateway = "x"', "gateway: must be a table"),
    ('[mqtt]\nmax_packet_size = "big"', "mqtt.max_packet_size: must be an integer from 16 to"),
    ("[mqtt]\nmax_packet_size = 15", "mqtt.max_packet_size: must be an integer"),
    ("[mqtt]\nmax_packet_size = 268435456", "mqtt.max_packet_size: must be an integer"),
    ("[mqtt]\nmax_packet_size = 1.5", "mqtt.max_packet_size: must be an integer"),
    ("[mqtt]\nmax_packet_size = true", "mqtt.max_packet_size: must be an integer"),
    ("[mqtt]\nreceive_maximum = 0", "mqtt.receive_maximum: must be an integer from 1 to 65535"),
    ("[mqtt]\nreceive_maximum = 65536", "mqtt.receive_maximum: must be an integer"),
    ("[mqtt]\nmax_qos = 3", "mqtt.max_qos: must be an integer from 0 to 2"),
    ("[mqtt]\ntopic_alias_maximum = -1", "mqtt.topic_alias_maximum: must be an integer"),
    ("[mqtt]\nmax_connections = 0", "mqtt.max_connections: must be an integer"),
    ("[mqtt]\nmax_queued_bytes = -1", "mqtt.max_queued_bytes: must be an integer"),
    ("[mqtt]\nmax_session_expiry = 4294967296", "mqtt.max_session_expiry: must be an integer"),
    ("[mqtt]\nserver_keep_alive = 70000", "mqtt.server_keep_alive: must be an integer"),
    ("[mqtt]\nmax_keep_alive = 0", "mqtt.max_keep_alive: must be an integer"),
    ("[mqtt]\npublish_burst = -1", "mqtt.publish_burst: must be an integer"),
    ('[mqtt]\nretain_available = "yes"', "mqtt.retain_available: must be true or false"),
    ("[mqtt]\nsys_interval = -1", "mqtt.sys_interval: must be a number"),
    ("[mqtt]\nsys_interval = nan", "mqtt.sys_interval: must be a number"),
    ('[mqtt]\npublish_rate = "fast"', "mqtt.publish_rate: must be a number"),
    ("[mqtt]\nconnect_rate = -0.5", "mqtt.connect_rate: must be a number"),
    ('[mqtt]\nlisen = ["tcp://127.0.0.1:1"]', 'mqtt.lisen: unknown key (did you mean "listen"?)'),
    ("[mqtt]\nmax_packet = 5", 'mqtt.max_packet: unknown key (did you mean "max_packet_size"?)'),
    ("[mqtt]\nzzz = 5", "mqtt.zzz: unknown key"),
    ("[mqtt]\nlisten = []", "mqtt.listen: must be a non-empty array"),
    ("[mqtt]\nlisten = 1883", "mqtt.listen: must be a non-empty array"),
    ('[mqtt]\nlisten = ["tcp://127.0.0.1:1", "udp://x"]', "mqtt.listen[1]: must be a URL"),
    ('[mqtt]\nlisten = ["tcp://a:1", "tcp://a:1"]', "mqtt.listen[1]: duplicate address"),
    ('[mqtt]\nlisten = ["tls://127.0.0.1:8883"]', "mqtt.tls: required because mqtt.listen[0]"),
    ('[mqtt]\nlisten = ["wss://127.0.0.1"]', "mqtt.tls: required because"),
    ('[mqtt.tls]\ncert = "nope.crt"\nkey = "nope.key"', "mqtt.tls.cert: file not found"),
    ('[mqtt.tls]\ncert = "c.pem"', "mqtt.tls.key: required"),
    ('[mqtt.tls]\ncert = "c.pem"\nkey = "c.pem"\nca = "c.pem"', "mqtt.tls.ca: unknown key"),
    (
        '[mqtt.tls]\ncert = "c.pem"\nkey = "c.pem"\nrequire_client_cert = true',
        "mqtt.tls.client_ca: required when require_client_cert = true",
    ),
    ('[mqtt.tls]\ncert = "c.pem"\nkey = "missing.key"', "mqtt.tls.key: file not found"),
    ('[auth]\nallow_anonymous = "no"', "auth.allow_anonymous: must be true or false"),
    ('[auth]\nacl_default = "block"', 'auth.acl_default: must be one of "allow", "deny"'),
    ("[auth]\nusers_file = 1", "auth.users_file: must be a non-empty path"),
    ('[auth]\nusers = "u.toml"', 'auth.users: unknown key (did you mean "users_file"?)'),
    ('[[acl]]\nuser = "*"\ntopic = "a/#/b"\naccess = "allow"', "acl[0].topic: must be a valid"),
    ('[[acl]]\nuser = "*"\ntopic = "a"\naccess = "maybe"', "acl[0].access: must be one of"),
    ('[[acl]]\nuser = "*"\ntopic = "a"\naccess = "allow"\naction = "read"', "acl[0].action:"),
    ('[[acl]]\nuser = "*"\naccess = "allow"', "acl[0].topic: required"),
    ('[[acl]]\ntopic = "a"\naccess = "allow"', "acl[0].user: required"),
    ('[[acl]]\nuser = "*"\ntopic = "a"', "acl[0].access: required"),
    ('[[acl]]\nuser = ""\ntopic = "a"\naccess = "deny"', "acl[0].user: must be"),
    (
        '[[acl]]\nuser = "*"\ntopic = "a"\naccess = "deny"\n[[acl]]\nuser = "*"\ntopic = "a"\n'
        'access = "deny"\ntopics = 1',
        'acl[1].topics: unknown key (did you mean "topic"?)',
    ),
    ('[[acl]]\nuser = "*"\ntopic = "$share/g/a"\naccess = "deny"', "acl[0].topic: must not"),
    ('acl = "none"', "acl: must be an array of tables"),
    ('[persistence]\ndurability = "sometimes"', "persistence.durability: must be one of"),
    ("[persistence]\ncommit_delay_ms = -1", "persistence.commit_delay_ms: must be a number"),
    ("[persistence]\ncommit_delay = 1", "persistence.commit_delay: unknown key (did you mean"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_validation_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.key is not None and str(info.value).startswith(info.value.key + ": ")


def test_error_shows_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[mqtt]\nmax_packet_size = "big"'))
    assert str(info.value) == (
        'mqtt.max_packet_size: must be an integer from 16 to 268435455, got "big"'
    )


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[mqtt]\nmax_qos = \n")
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 2") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_anonymous_on_public_listener_warns(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[mqtt]\nlisten = ["tcp://0.0.0.0:1883", "ws://[::1]"]'))
    assert len(cfg.warnings) == 1
    assert "allow_anonymous" in cfg.warnings[0] and "tcp://0.0.0.0:1883" in cfg.warnings[0]
    assert "[::1]" not in cfg.warnings[0]
    quiet = load_config(
        write(tmp_path, '[mqtt]\nlisten = ["tcp://localhost:1", "tcp://[::1]:2"]', "q.toml")
    )
    assert quiet.warnings == ()


def test_publish_burst_resolution() -> None:
    assert MqttSettings().publish_burst == 0
    assert MqttSettings(publish_rate=0.5).publish_burst == 1
    assert MqttSettings(publish_rate=20.0).publish_burst == 20
    assert MqttSettings(publish_rate=20.0, publish_burst=5).publish_burst == 5


def test_dataclasses_are_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.gateway.id = "x"  # type: ignore[misc]
