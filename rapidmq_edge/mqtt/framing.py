"""The optional C fast lane of :class:`~rapidmq_edge.mqtt.codec.PacketReader`
(``_framing.c``, built by ``pip install`` / ``setup.py build_ext`` when a compiler is
present), or None: the Python codec alone.

The C lane decodes only frames it fully understands (PUBLISH with an empty MQTT 5 property
block, PUBACK, PUBCOMP) and hands every other frame, and every frame that breaks a rule, to
the Python codec: the packets and the errors are the same either way
(tests/test_mqtt_framing.py, fuzz/mqtt_framing.py). Set ``RAPIDMQ_EDGE_PURE_PYTHON=1`` to
use the Python codec even when the extension is built (benchmarks compare the two this way).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .packets import Packet, Puback, Pubcomp, Publish

__all__ = ["SCAN", "TOPIC_SLOTS", "Scan"]

#: scan(buf, pos, v5, max_size, out, topics) -> pos (rest incomplete) or -pos - 1 (the
#: frame at pos is for the Python codec); see _framing.c
Scan = Callable[[bytearray, int, bool, int, list[Packet], list[str | None]], int]

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
        _framing.configure(Publish, Puback, Pubcomp)
    except TypeError:  # the packet classes changed: the lane no longer knows how to fill them
        return None
    scan: Scan = _framing.scan
    return scan


#: the C lane's scan function, or None when the Python codec is used alone
SCAN: Scan | None = _load()
