"""The message id frame: the gateway's message id inside the payload, for MQTT 3.1.1 (sans-I/O).

On an MQTT 5 upstream the id of a protected message (``gateway:queue-id``) travels as the
``rmq-id`` User Property; MQTT 3.1.1 has no properties, so there the uplink wraps the payload
of a protected rule's message in this frame (docs/cloud.md, "The message id on MQTT 3.1.1")::

    magic  FF 52 4D 51   (0xFF, "RMQ": 0xFF starts neither UTF-8 text nor a CBOR item)
    1 B    version       (1)
    2 B    id length     (big endian, 1..65535)
    n B    id            (UTF-8, e.g. "gw7:1234")
    rest   the payload   (the protected bytes, unchanged: envelope or signed plaintext)

Only protected messages are framed (the batch leaf covers the inner payload, never the frame);
the cloud consumer unwraps it and refuses a malformed frame as ``unverifiable``.
"""

from __future__ import annotations

__all__ = ["FRAME_PROPS", "MAGIC", "VERSION", "IdFrameError", "decode_id_frame",
           "encode_id_frame", "is_id_frame"]

MAGIC = b"\xffRMQ"
VERSION = 1
_HEAD = len(MAGIC) + 3  # magic, version, id length
#: what the queue holds as "properties" of a protected message bound for a 3.1.1 upstream
#: (never a valid property block: identifier 0 does not exist): the uplink frames those
FRAME_PROPS = b"\x01\x00"


class IdFrameError(ValueError):
    """A payload that starts like an id frame but is not a valid one (the reason says why)."""


def encode_id_frame(message_id: bytes, payload: bytes) -> bytes:
    """``payload`` with ``message_id`` (UTF-8 bytes, 1..65535 of them) in front, framed."""
    n = len(message_id)
    if not 0 < n < 0x10000:
        raise ValueError(f"message id must be 1..65535 bytes, got {n}")
    return b"".join((MAGIC, VERSION.to_bytes(1, "big"), n.to_bytes(2, "big"), message_id,
                     payload))


def is_id_frame(payload: bytes) -> bool:
    """Whether ``payload`` starts with the frame's magic (it may still be malformed)."""
    return payload[:4] == MAGIC


def decode_id_frame(frame: bytes) -> tuple[str, bytes]:
    """(message id, the payload inside) of a frame; raises :class:`IdFrameError` naming what
    is wrong (no magic, unknown version, truncated, empty or non-UTF-8 id)."""
    if frame[:4] != MAGIC:
        raise IdFrameError("no id frame magic (FF 52 4D 51)")
    if len(frame) < _HEAD:
        raise IdFrameError(f"truncated header ({len(frame)} of {_HEAD} bytes)")
    version = frame[4]
    if version != VERSION:
        raise IdFrameError(f"unsupported id frame version {version} (this build reads "
                           f"{VERSION})")
    n = int.from_bytes(frame[5:7], "big")
    if n == 0:
        raise IdFrameError("empty message id")
    if len(frame) < _HEAD + n:
        raise IdFrameError(f"truncated message id ({len(frame) - _HEAD} of {n} bytes)")
    try:
        mid = frame[_HEAD:_HEAD + n].decode()
    except UnicodeDecodeError:
        raise IdFrameError("message id is not UTF-8") from None
    return mid, frame[_HEAD + n:]
