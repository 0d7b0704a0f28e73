"""Replay every committed fuzz corpus through its harness's ``check()`` (no atheris needed).

This is what CI runs of the fuzzers: each seed and each regression input (``crash-*``,
an input that once broke an invariant) must satisfy the invariants of its harness
(fuzz/README.md). ``fuzz/pending/`` (known bugs not fixed yet) is not replayed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from fuzz import _harness
from fuzz.run import TARGETS, _parse

ROOT = Path(__file__).resolve().parent.parent
#: a regression input per fixed bug; fewer crash-* files than this means one was lost
MIN_REGRESSIONS = {"mqtt_codec": 0, "mqtt_framing": 0, "coap": 2, "cose": 8, "http_api": 5,
                   "config_files": 0}


def _harness_module(target: str) -> ModuleType:
    return importlib.import_module(f"fuzz.{target}")


def _cases() -> list[tuple[str, Path]]:
    return [(t, p) for t in TARGETS for p in _harness.corpus_files(t)]


@pytest.mark.parametrize(
    ("target", "path"), _cases(), ids=[f"{t}/{p.name}" for t, p in _cases()]
)
def test_corpus_input_keeps_the_invariants(target: str, path: Path) -> None:
    check: Callable[[bytes], None] = _harness_module(target).check
    check(path.read_bytes())  # raises (AssertionError or the escaping exception) on a break


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_has_a_small_seed_corpus(target: str) -> None:
    files = list(_harness.corpus_files(target))
    seeds = [p for p in files if p.name.startswith("seed-")]
    crashes = [p for p in files if p.name.startswith("crash-")]
    assert len(seeds) >= 20, f"{target}: only {len(seeds)} seeds"
    assert len(crashes) >= MIN_REGRESSIONS[target]
    assert all(p.stat().st_size <= 8192 for p in files), "corpus files must stay small"
    assert all(p.name.startswith(("seed-", "crash-")) for p in files), [p.name for p in files]


def test_corpus_total_size_is_small() -> None:
    total = sum(p.stat().st_size for t in TARGETS for p in _harness.corpus_files(t))
    assert total < 2 * 1024 * 1024


def test_harnesses_import_without_atheris() -> None:
    """The replay needs no atheris: importing a harness must not import it."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'atheris':\n"
        "            raise ImportError('atheris blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for t in {list(TARGETS)!r}:\n"
        "    __import__('fuzz.' + t)\n"
        "print('imported', 'atheris' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "imported False", out.stderr


# ----------------------------------------------------------------- the harnesses do check


def test_mqtt_harness_catches_a_broken_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _harness_module("mqtt_codec")
    seed = (_harness.CORPUS / "mqtt_codec" / "seed-4-connect").read_bytes()
    mod.check(seed)

    def lossy(packet: object, version: int) -> bytes:
        from rapidmq_edge.mqtt.codec import encode
        from rapidmq_edge.mqtt.packets import Connect

        if isinstance(packet, Connect):  # the round trip now changes the packet
            packet = dataclasses.replace(packet, keep_alive=packet.keep_alive + 1)
        return encode(packet, version)  # type: ignore[arg-type]

    monkeypatch.setattr(mod, "encode", lossy)
    with pytest.raises(AssertionError, match="round trip"):
        mod.check(seed)


def test_mqtt_harness_catches_a_foreign_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _harness_module("mqtt_codec")

    class Broken:
        def __init__(self, *args: object) -> None:
            pass

        def feed(self, data: bytes) -> list[object]:
            raise KeyError("not an MqttError")

    monkeypatch.setattr(mod, "PacketReader", Broken)
    with pytest.raises(KeyError):
        mod.check(b"\x00\x10\x00")


def test_coap_harness_catches_a_non_canonical_serializer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = _harness_module("coap")
    seed = (_harness.CORPUS / "coap" / "seed-dgram-post-data").read_bytes()
    mod.check(seed)
    real = mod.codec.serialize
    monkeypatch.setattr(mod.codec, "serialize", lambda msg: real(msg) + b"\xff!")
    with pytest.raises(AssertionError, match="serializes to"):
        mod.check(seed)


def test_http_harness_fails_on_a_server_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from rapidmq_edge.ingress import http

    mod = _harness_module("http_api")
    seed = (_harness.CORPUS / "http_api" / "seed-publish-minimal").read_bytes()
    mod.check(seed)

    def boom(data: object) -> object:
        raise RuntimeError("handler bug")

    monkeypatch.setattr(http, "_publish_fields", boom)
    with pytest.raises(AssertionError, match="handler bug"):
        mod.check(seed)


def test_http_publish_refuses_a_content_type_longer_than_mqtt_allows() -> None:
    """Found by review, not by the fuzzer (an input over libFuzzer's 4 KiB): a content type
    of more than 65,535 UTF-8 bytes was accepted and could not be encoded as MQTT."""
    mod = _harness_module("http_api")
    body = json.dumps({"topic": "a", "payload": "x", "content_type": "c" * 65536}).encode()
    mod.check(b"\x01\x00" + body)  # the tap would report an unencodable message
    out = mod.fixture().exchange(mod.build_request(b"\x01\x00" + body)[0])
    assert out.startswith(b"HTTP/1.1 400 ")


def test_config_harness_accepts_only_the_loaders_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod = _harness_module("config_files")
    mod.check(b"\x00[gateway]\nid = 5\n")  # a ConfigError: fine

    def boom(path: Path) -> object:
        raise ValueError("not a ConfigError")

    monkeypatch.setattr(mod, "load_config", boom)
    with pytest.raises(ValueError):
        mod.check(b"\x00")


def test_pending_signatures_name_a_project_frame() -> None:
    for line in _harness.known_pending():
        kind, where = line.split(" ", 1)
        assert kind.isidentifier() and where.startswith("rapidmq_edge/") and ":" in where


def test_run_summary_parser_reads_libfuzzer_output() -> None:
    log = (
        "#402\tINITED cov: 446 ft: 1053 corp: 138/3014b exec/s: 0 rss: 44Mb\n"
        "#9000\tNEW    cov: 450 ft: 1100 corp: 140/3100b lim: 150 exec/s: 4500 rss: 45Mb\n"
        "#9999\tDONE   cov: 456 ft: 1441 corp: 254/6952b lim: 1661 exec/s: 5386 rss: 45Mb\n"
        "stat::number_of_executed_units: 9999\nstat::average_exec_per_sec:     5386\n"
    )
    stats = _parse(log)
    assert (stats["start_cov"], stats["cov"], stats["ft"]) == (446, 456, 1441)
    assert stats["number_of_executed_units"] == 9999 and stats["corpus_units"] == 254
