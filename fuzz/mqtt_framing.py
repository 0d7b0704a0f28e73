"""Fuzz the C fast lane of the MQTT reader (``mqtt/_framing.c``) against the Python codec.

Input: one mode byte, then a byte stream. ``mode % 4`` picks the reader's protocol level
(0: unknown, the stream starts with CONNECT as on a server; then 3, 4 or 5); bit 0x80 lowers
the maximum packet size to 64 bytes; bits 0x7C (``(mode >> 2) & 0x1F``) pick a chunk size
(0: the whole stream at once, else that many bytes per ``feed``).

Invariant: a reader with the C lane and a reader without it, fed the same chunks, return
the same packets (``raw`` bytes included), raise or keep the same error (type and message),
leave the same bytes buffered and end at the same protocol level (the lane reads a first
CONNECT itself). The C lane hands every frame it does not fully
understand to the Python codec, so any difference is a bug of the lane (a frame it accepted
that the codec refuses or reads otherwise, or a frame boundary it got wrong). Without the
extension built, the check compares the Python codec with itself (and says so).
"""

from __future__ import annotations

import sys

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from rapidmq_edge.mqtt.codec import PacketReader
    from rapidmq_edge.mqtt.errors import MqttError
    from rapidmq_edge.mqtt.framing import SCAN
    from rapidmq_edge.mqtt.packets import Packet

__all__ = ["ACCELERATED", "check", "main", "read"]

TARGET = "mqtt_framing"
#: False when the extension is not built: the check then compares Python with Python
ACCELERATED = SCAN is not None
_VERSIONS = (0, 3, 4, 5)
_SMALL_MAX = 64
_DEFAULT_MAX = 268_435_460

Outcome = tuple[list[Packet], list[bytes | None], str | None, int, int]


def read(data: bytes, version: int, max_size: int, chunk: int, accelerated: bool) -> Outcome:
    """Feed ``data`` in chunks of ``chunk`` bytes (0: at once) until the first error:
    (packets, their raw bytes, ``"Type: message"`` of the error or None, bytes left, the
    reader's protocol level)."""
    reader = PacketReader(max_size, version, accelerated=accelerated)
    packets: list[Packet] = []
    step = chunk or max(1, len(data))
    error: str | None = None
    for at in range(0, len(data), step):
        try:
            packets += reader.feed(data[at:at + step])
        except MqttError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
        if reader.error is not None:
            err = reader.error
            if not isinstance(err, MqttError):
                raise err
            error = f"{type(err).__name__}: {err}"
            break
    raws = [getattr(p, "raw", None) for p in packets]
    return packets, raws, error, reader.buffered, reader.version


def check_stream(data: bytes, version: int, max_size: int = _DEFAULT_MAX,
                 chunk: int = 0) -> None:
    """The C lane and the Python codec agree on ``data``."""
    fast = read(data, version, max_size, chunk, True)
    slow = read(data, version, max_size, chunk, False)
    assert fast[0] == slow[0], f"packets: C lane {fast[0]!r}, Python {slow[0]!r}"
    assert fast[1] == slow[1], f"raw bytes: C lane {fast[1]!r}, Python {slow[1]!r}"
    assert fast[2] == slow[2], f"error: C lane {fast[2]!r}, Python {slow[2]!r}"
    assert fast[3] == slow[3], f"left: C lane {fast[3]}, Python {slow[3]}"
    assert fast[4] == slow[4], f"version: C lane {fast[4]}, Python {slow[4]}"
    for a, b in zip(fast[0], slow[0], strict=True):
        assert type(a) is type(b), f"classes {type(a)} / {type(b)}"


def check(data: bytes) -> None:
    """Raise AssertionError (or the escaping exception) when the two readers differ."""
    if not data:
        return
    mode = data[0]
    max_size = _SMALL_MAX if mode & 0x80 else _DEFAULT_MAX
    check_stream(data[1:], _VERSIONS[mode % 4], max_size, (mode >> 2) & 0x1F)


def main() -> None:
    """Run under atheris: ``python -m fuzz.mqtt_framing [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
