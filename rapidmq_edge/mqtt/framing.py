"""The optional C fast lane of :class:`~rapidmq_edge.mqtt.codec.PacketReader`
(``_framing.c``, built by ``pip install`` / ``setup.py build_ext`` when a compiler is
present), or None: the Python codec alone.

The C lane decodes only frames it fully understands (PUBLISH with an empty MQTT 5 property
block, PUBACK, PUBCOMP, a CONNECT without Will or properties, a SUBSCRIBE without
properties) and hands every other frame, and every frame that breaks a rule, to
the Python codec: the packets and the errors are the same either way
(tests/test_mqtt_framing.py, fuzz/mqtt_framing.py). Set ``RAPIDMQ_EDGE_PURE_PYTHON=1`` to
use the Python codec even when the extension is built (benchmarks compare the two this way).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .packets import Connect, Packet, Puback, Pubcomp, Publish, SubOptions, Subscribe

__all__ = ["SCAN", "SUB_OPTIONS", "TOPIC_SLOTS", "Scan"]

#: scan(buf, pos, version, max_size, out, topics) -> pos (rest incomplete) or -pos - 1 (the
#: frame at pos is for the Python codec); version 0: the first packet, a CONNECT; see _framing.c
Scan = Callable[[bytes | bytearray, int, int, int, list[Packet], list[str | None]], int]


def _sub_options(v5: bool) -> tuple[SubOptions | None, ...]:
    """The SubOptions of each subscription option byte, None where the byte breaks a rule
    (QoS 3; reserved bits; MQTT 5 retain handling 3). SubOptions is frozen: one object per
    byte is shared by every SUBSCRIBE decoded."""
    table: list[SubOptions | None] = []
    for b in range(256):
        qos, rh = b & 0x03, (b >> 4) & 0x03
        if qos == 3 or (b & 0xC0 if v5 else b & 0xFC) or (v5 and rh == 3):
            table.append(None)
        elif v5:
            table.append(SubOptions(qos, bool(b & 0x04), bool(b & 0x08), rh))
        else:
            table.append(SubOptions(qos))
    return tuple(table)


#: (3.1.1 table, 5.0 table) of :func:`_sub_options`
SUB_OPTIONS = (_sub_options(False), _sub_options(True))

#: entries of the readers' topic cache (a recent topic gets the same str object)
TOPIC_SLOTS = 256


def _load() -> Scan | None:
    if os.environ.get("RAPIDMQ_EDGE_PURE_PYTHON"):
        return None
    try:
        from . import _framing  # type: ignore[attr-defined]
    except ImportError:  # not built here (no compiler): the Python codec alone
        return None
    try:
        _framing.configure(Publish, Puback, Pubcomp, Connect, Subscribe, SUB_OPTIONS)
    except TypeError:  # the packet classes changed: the lane no longer knows how to fill them
        return None
    scan: Scan = _framing.scan
    return scan


#: the C lane's scan function, or None when the Python codec is used alone
SCAN: Scan | None = _load()
