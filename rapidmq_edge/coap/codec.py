"""CoAP message codec (RFC 7252 §3): parse and serialize datagrams, pure functions.

A message is ``Message(mtype, code, mid, token, options, payload)`` with ``options`` a tuple
of ``(number, value bytes)`` in ascending number order (repeated options keep their order).
:func:`parse` raises :class:`MessageFormatError` for every datagram RFC 7252 calls a message
format error (§3, §3.1, §4.2): short header, version other than 1, token length 9-15,
reserved option nibble 15, option or token running past the end, payload marker without a
payload, and a non-empty Empty message (code 0.00 with a token, options or payload).
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
CON, NON, ACK, RST = 0, 1, 2, 3

# method and response codes as class * 32 + detail
EMPTY = 0
GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH = 1, 2, 3, 4, 5, 6, 7
CREATED, DELETED, VALID, CHANGED, CONTENT = 65, 66, 67, 68, 69
BAD_REQUEST, UNAUTHORIZED, BAD_OPTION, FORBIDDEN, NOT_FOUND = 128, 129, 130, 131, 132
METHOD_NOT_ALLOWED, PRECONDITION_FAILED, REQUEST_ENTITY_TOO_LARGE = 133, 140, 141
UNSUPPORTED_CONTENT_FORMAT, TOO_MANY_REQUESTS = 143, 157
INTERNAL_SERVER_ERROR, SERVICE_UNAVAILABLE = 160, 163

# option numbers
IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT = 1, 3, 4, 5, 6, 7
LOCATION_PATH, OSCORE, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY = 8, 9, 11, 12, 14, 15
ACCEPT, LOCATION_QUERY, BLOCK2, BLOCK1, SIZE2, SIZE1 = 17, 20, 23, 27, 28, 60

PAYLOAD_MARKER = 0xFF


class MessageFormatError(ValueError):
    """The datagram is not a well-formed CoAP message."""


@dataclass(frozen=True, slots=True)
class Message:
    """One CoAP message; ``code`` is ``class * 32 + detail``."""

    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        """The first value of option ``number``, or None when absent."""
        for n, v in self.options:
            if n == number:
                return v
        return None

    def option_values(self, number: int) -> list[bytes]:
        """Every value of a repeatable option, in order."""
        return [v for n, v in self.options if n == number]


def code_str(code: int) -> str:
    """``"2.04"`` for code 68."""
    return f"{code >> 5}.{code & 31:02d}"


def is_request(code: int) -> bool:
    """Class 0 with a non-zero detail: a method."""
    return 0 < code < 32


def encode_uint(value: int) -> bytes:
    """An option uint (RFC 7252 §3.2): big-endian, no leading zero bytes (0 is empty)."""
    if value < 0:
        raise ValueError("uint option values are non-negative")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes) -> int:
    """The integer of a uint option value (leading zeros are tolerated)."""
    return int.from_bytes(value, "big")


def parse(data: bytes) -> Message:
    """Decode one datagram; raises :class:`MessageFormatError` when it is malformed."""
    n = len(data)
    if n < 4:
        raise MessageFormatError("shorter than the 4-byte header")
    b0 = data[0]
    if b0 >> 6 != VERSION:
        raise MessageFormatError(f"version {b0 >> 6}")
    tkl = b0 & 0x0F
    if tkl > 8:
        raise MessageFormatError(f"token length {tkl}")
    i = 4 + tkl
    if i > n:
        raise MessageFormatError("token runs past the end")
    code = data[1]
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while i < n:
        byte = data[i]
        if byte == PAYLOAD_MARKER:
            if i + 1 == n:
                raise MessageFormatError("payload marker followed by a zero-length payload")
            payload = data[i + 1:]
            break
        i += 1
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 15:
                raise MessageFormatError("option delta 15")
            if delta == 13:
                if i >= n:
                    raise MessageFormatError("extended option delta runs past the end")
                delta = data[i] + 13
                i += 1
            else:
                if i + 2 > n:
                    raise MessageFormatError("extended option delta runs past the end")
                delta = ((data[i] << 8) | data[i + 1]) + 269
                i += 2
        if length >= 13:
            if length == 15:
                raise MessageFormatError("option length 15")
            if length == 13:
                if i >= n:
                    raise MessageFormatError("extended option length runs past the end")
                length = data[i] + 13
                i += 1
            else:
                if i + 2 > n:
                    raise MessageFormatError("extended option length runs past the end")
                length = ((data[i] << 8) | data[i + 1]) + 269
                i += 2
        number += delta
        if number > 0xFFFF:
            raise MessageFormatError("option number over 65535")
        end = i + length
        if end > n:
            raise MessageFormatError(f"option {number} runs past the end")
        options.append((number, data[i:end]))
        i = end
    if code == EMPTY and (tkl or options or payload):
        raise MessageFormatError("Empty message with content")
    return Message((b0 >> 4) & 3, code, (data[2] << 8) | data[3], data[4:4 + tkl],
                   tuple(options), payload)


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def serialize(msg: Message) -> bytes:
    """Encode ``msg``; options are written in ascending number order (stable)."""
    if not 0 <= msg.mtype <= 3 or not 0 <= msg.code <= 255 or not 0 <= msg.mid <= 0xFFFF:
        raise ValueError("type, code or message id out of range")
    if len(msg.token) > 8:
        raise ValueError("token longer than 8 bytes")
    out = bytearray((0x40 | (msg.mtype << 4) | len(msg.token), msg.code,
                     msg.mid >> 8, msg.mid & 0xFF))
    out += msg.token
    last = 0
    for number, value in sorted(msg.options, key=lambda o: o[0]):
        if not 0 <= number <= 0xFFFF or len(value) > 0xFFFF + 269:
            raise ValueError(f"option {number} out of range")
        d, dx = _nibble(number - last)
        ln, lx = _nibble(len(value))
        out.append((d << 4) | ln)
        out += dx
        out += lx
        out += value
        last = number
    if msg.payload:
        out.append(PAYLOAD_MARKER)
        out += msg.payload
    return bytes(out)


def reset_for(data: bytes) -> bytes | None:
    """The RST rejecting a malformed confirmable datagram (RFC 7252 §4.2), when its header
    can be read (version 1, type CON); None: the datagram is silently dropped."""
    if len(data) >= 4 and data[0] >> 6 == VERSION and (data[0] >> 4) & 3 == CON:
        return bytes((0x70, EMPTY, data[2], data[3]))
    return None


def response(request: Message, code: int, options: tuple[tuple[int, bytes], ...] = (),
             payload: bytes = b"", mid: int | None = None) -> bytes:
    """The serialized response to ``request``: piggybacked on the ACK of a CON request,
    or a NON with message id ``mid`` for a NON request (RFC 7252 §5.2)."""
    if request.mtype == CON:
        return serialize(Message(ACK, code, request.mid, request.token, options, payload))
    return serialize(Message(NON, code, request.mid if mid is None else mid, request.token,
                             options, payload))


__all__ = [
    "Message", "MessageFormatError", "parse", "serialize", "response", "reset_for",
    "encode_uint", "decode_uint", "code_str", "is_request",
]
