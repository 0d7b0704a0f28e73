"""Fast path for what an uplink mostly receives: runs of plain PUBACKs (sans-I/O).

Under load the upstream's replies are almost only PUBACKs of 4 bytes (``40 02 id id``;
MQTT 5 may add a reason code, and a zero property length). Decoding each one through the
general packet reader costs more than the rest of the acknowledgement path, so the uplink
first takes such PUBACKs off the front of the received bytes with this scanner and hands
the rest (anything else, an incomplete packet) to the general reader.
"""

from __future__ import annotations

import struct

__all__ = ["leading_pubacks"]

_PUBACK = 0x40


def leading_pubacks(data: bytes, v5: bool) -> tuple[list[tuple[int, int]], int]:
    """``(packet id, reason code)`` of the complete plain PUBACKs at the start of ``data``
    and the number of bytes they take.

    Plain means: first byte ``0x40``, Remaining Length 2 (any version), or for MQTT 5
    Remaining Length 3 (a reason code) or 4 (a reason code and an empty property block).
    Scanning stops at the first packet that is anything else, incomplete, or malformed
    (packet id 0): the general reader handles it and reports errors as usual.
    """
    n = len(data)
    # the common case: nothing but 4-byte PUBACKs
    if n >= 4 and not n % 4:
        count = n // 4
        if data[0::4] == b"\x40" * count and data[1::4] == b"\x02" * count:
            pids = struct.unpack(f">{2 * count}H", data)[1::2]
            if 0 not in pids:
                return [(pid, 0) for pid in pids], n
    out: list[tuple[int, int]] = []
    pos = 0
    while n - pos >= 4 and data[pos] == _PUBACK:
        length = data[pos + 1]
        pid = (data[pos + 2] << 8) | data[pos + 3]
        if not pid:
            break
        if length == 2:
            out.append((pid, 0))
        elif v5 and n - pos >= 2 + length and (
            length == 3 or (length == 4 and data[pos + 5] == 0)
        ):
            out.append((pid, data[pos + 4]))
        else:
            break
        pos += 2 + length
    return out, pos
