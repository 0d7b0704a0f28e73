"""Fuzz the MQTT 3.1.1/5.0 codec: ``PacketReader``, ``decode_packet``, ``encode`` and the
property block codec.

Input: one mode byte, then the bytes under test.

* modes 0-3 (``byte % 5``): a byte stream read by a :class:`PacketReader` whose protocol
  level is unknown (0: the stream starts with CONNECT, as on a server) or preset to 3, 4 or
  5. Bit 0x80 of the mode byte lowers the reader's maximum packet size to 64 bytes.
* mode 4: one property block; the next byte picks the packet type whose rules apply.

Invariants:

* only :class:`~rapidmq_edge.mqtt.errors.MqttError` (and subclasses) escape;
* feeding the stream one byte at a time gives the same packets, the same error and the same
  leftover as feeding it all at once;
* every decoded packet survives ``decode(encode(p)) == p`` at the protocol level it was read
  with, and its encoding is stable (``encode(decode(encode(p))) == encode(p)``); the raw bytes
  a reader keeps for a QoS 0 PUBLISH decode to the same packet;
* a property block decodes to properties whose encoding decodes to the same properties;
* the reader's framing (its PUBLISH fast lane included) gives the same packets, the same
  error and the same leftover as a plain reference framer that hands every frame to
  ``decode_packet`` (:func:`_read_reference`).
"""

from __future__ import annotations

import sys

from fuzz._harness import fuzz_main, instrumented

with instrumented(__name__ == "__main__"):
    from rapidmq_edge.mqtt.codec import PacketReader, decode_packet, encode
    from rapidmq_edge.mqtt.errors import MalformedPacket, MqttError, PacketTooLarge
    from rapidmq_edge.mqtt.packets import CONNECT, MQTT_5, PUBLISH, Connect, Packet, Publish
    from rapidmq_edge.mqtt.properties import ALLOWED, decode_properties, encode_properties

__all__ = ["check", "main"]

TARGET = "mqtt_codec"
_VERSIONS = (0, 3, 4, 5)
_PROPERTY_KINDS: list[int | str] = sorted(ALLOWED, key=str)
_SMALL_MAX = 64
_DEFAULT_MAX = 268_435_460

Outcome = tuple[list[Packet], MqttError | None, int]


def _read_all(data: bytes, version: int, max_size: int) -> Outcome:
    reader = PacketReader(max_size, version)
    try:
        packets = reader.feed(data)
    except MqttError as exc:
        return [], exc, reader.buffered
    err = reader.error
    if err is not None and not isinstance(err, MqttError):
        raise err
    return packets, err, reader.buffered


def _read_bytewise(data: bytes, version: int, max_size: int) -> Outcome:
    reader = PacketReader(max_size, version)
    packets: list[Packet] = []
    for i in range(len(data)):
        try:
            packets += reader.feed(data[i:i + 1])
        except MqttError as exc:
            return packets, exc, reader.buffered
        if reader.error is not None:
            err = reader.error
            if not isinstance(err, MqttError):
                raise err
            return packets, err, reader.buffered
    return packets, None, reader.buffered


def _read_reference(data: bytes, version: int, max_size: int) -> Outcome:
    """The spec's framing, one frame at a time, every body through ``decode_packet``."""
    packets: list[Packet] = []
    pos, n = 0, len(data)
    try:
        while n - pos >= 2:
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= n:
                    return packets, None, n - pos
                if i - pos > 4:
                    raise MalformedPacket("remaining length longer than 4 bytes")
                byte = data[i]
                i += 1
                length += (byte & 0x7F) * mult
                mult *= 128
                if not byte & 0x80:
                    break
            if i - pos > 2 and data[i - 1] == 0 and version == MQTT_5:
                raise MalformedPacket("remaining length not minimally encoded")
            total = i - pos + length
            if total > max_size:
                raise PacketTooLarge(f"packet of {total} bytes exceeds maximum packet size")
            if n - pos < total:
                break
            packet = decode_packet(data[pos], data[i:pos + total], version)
            if packet.type == PUBLISH and not data[pos] & 0x0F:
                packet.raw = data[pos:pos + total]  # type: ignore[union-attr]
            elif packet.type == CONNECT:
                version = packet.protocol_level  # type: ignore[union-attr]
            packets.append(packet)
            pos += total
    except MqttError as exc:
        return packets, exc, n - pos
    return packets, None, n - pos


def _same_error(a: MqttError | None, b: MqttError | None) -> bool:
    if a is None or b is None:
        return a is b
    return type(a) is type(b) and str(a) == str(b)


def _decode_one(data: bytes, version: int) -> Packet:
    reader = PacketReader(version=version)
    got = reader.feed(data)
    assert reader.error is None, f"re-decoding left an error: {reader.error!r}"
    assert len(got) == 1 and reader.buffered == 0, f"re-decoding gave {got!r}"
    return got[0]


def _round_trip(packets: list[Packet], version: int) -> None:
    for packet in packets:
        if packet.type == CONNECT:
            assert isinstance(packet, Connect)
            read_as, level = 0, packet.protocol_level
        else:
            read_as = level = version
        wire = encode(packet, level)
        again = _decode_one(wire, read_as)
        assert again == packet, f"round trip changed {packet!r} into {again!r}"
        assert encode(again, level) == wire, f"encoding of {packet!r} is not stable"
        if isinstance(packet, Publish) and packet.raw is not None:
            assert _decode_one(packet.raw, read_as) == packet, "kept raw bytes differ"
        version = level


def check_stream(data: bytes, version: int, max_size: int = _DEFAULT_MAX) -> None:
    """The stream invariants for ``data`` read at protocol level ``version``."""
    packets, err, left = _read_all(data, version, max_size)
    packets_b, err_b, left_b = _read_bytewise(data, version, max_size)
    assert packets == packets_b, f"bytewise {packets_b!r} != at once {packets!r}"
    assert _same_error(err, err_b), f"bytewise error {err_b!r} != at once {err!r}"
    if err is None:
        assert left == left_b, f"bytewise leaves {left_b} bytes, at once {left}"
    packets_r, err_r, left_r = _read_reference(data, version, max_size)
    assert packets == packets_r[:len(packets)], f"reference {packets_r!r} != {packets!r}"
    if err is None:
        assert err_r is None and packets == packets_r and left == left_r, (
            f"reference read {packets_r!r}, {err_r!r}, {left_r} left; reader {left} left")
    else:
        assert _same_error(err, err_r), f"reference error {err_r!r} != reader's {err!r}"
    for p, r in zip(packets, packets_r, strict=False):  # raw is not part of ==
        assert getattr(p, "raw", None) == getattr(r, "raw", None), f"raw bytes of {p!r}"
    _round_trip(packets, version)


def check_properties(data: bytes) -> None:
    """The property block invariants: byte 0 picks the packet type, the rest is the block."""
    if not data:
        return
    kind = _PROPERTY_KINDS[data[0] % len(_PROPERTY_KINDS)]
    block = data[1:]
    try:
        props, pos = decode_properties(memoryview(block), 0, len(block), kind)
    except MqttError:
        return
    assert 0 < pos <= len(block)
    wire = encode_properties(props)
    again, end = decode_properties(wire, 0, len(wire), kind)
    assert end == len(wire) and again == props, f"properties {props!r} came back as {again!r}"
    assert encode_properties(again) == wire


def check(data: bytes) -> None:
    """Raise (AssertionError or the escaping exception) when an invariant breaks."""
    if not data:
        return
    mode = data[0] & 0x7F
    if mode % 5 == 4:
        check_properties(data[1:])
        return
    max_size = _SMALL_MAX if data[0] & 0x80 else _DEFAULT_MAX
    check_stream(data[1:], _VERSIONS[mode % 5], max_size)


def main() -> None:
    """Run under atheris: ``python -m fuzz.mqtt_codec [libFuzzer flags] [corpus dirs]``."""
    fuzz_main(check, sys.argv)


if __name__ == "__main__":
    main()
