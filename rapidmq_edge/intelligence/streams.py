"""The numeric reading of a payload and its time: what the stream detector is fed.

Pure stdlib, no I/O. :func:`reading_value` finds a payload's ``"value"``,
:func:`reading_time` its ``"ts"``, and :func:`value_span` lets a caller that already has a
payload's digit template (:data:`TEMPLATE`) find the value with one slice.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

# =========================================================================== readings

#: a flat JSON object's top-level numeric "value" (the fast path of :func:`reading_value`)
_VALUE_RE = re.compile(rb'[{,]\s*"value"\s*:\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?=\s*[,}])')
#: digits -> "0" (``payload.translate(TEMPLATE)``): a payload's *template*; the payloads of
#: one template differ only in their digits
TEMPLATE = bytes.maketrans(b"0123456789", b"0" * 10)
#: :func:`value_span` of a template whose payloads need :func:`reading_value` in full, and
#: of one whose payloads have no reading
PARSE, NO_VALUE = (-1, -1), (-2, -2)


def _flat_json(payload: bytes) -> bool:
    """A flat JSON object: one ``{``, no ``[``, ending in ``}`` (digit-independent)."""
    return (payload.count(b"{") == 1 and b"[" not in payload
            and payload.rstrip()[-1:] == b"}")


def reading_value(payload: bytes) -> float | None:
    """The numeric ``"value"`` of a JSON or CBOR map payload; None when there is none.

    A flat JSON object (one ``{``, no ``[``, ending in ``}``) is read with one regex
    instead of a full parse (~0.5 µs instead of ~3 µs); anything else is parsed.
    """
    if not payload:
        return None
    first = payload[0]
    try:
        if first == 0x7B:  # "{"
            if b'"value"' not in payload and b"\\" not in payload:
                return None  # no "value" key (json.loads would find one only if escaped)
            if _flat_json(payload):
                found = _VALUE_RE.findall(payload)
                if found:
                    f = float(found[-1])  # a repeated key: JSON keeps the last one
                    return f if math.isfinite(f) else None
            obj: Any = json.loads(payload)
        elif 0xA0 <= first <= 0xBF:  # CBOR map
            import cbor2

            obj = cbor2.loads(payload)
        else:
            return None
    except (ValueError, UnicodeDecodeError, Exception):
        return None
    v: Any = obj.get("value") if isinstance(obj, dict) else None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


_TS_RE = re.compile(rb'"ts"\s*:\s*(?:(-?[0-9][0-9.eE+-]*)|"([^"\\]{1,64})")')


def reading_time(payload: bytes) -> float | None:
    """The device's own time of a reading, in epoch seconds: a JSON ``"ts"`` (or a CBOR map's
    ``ts``) as epoch seconds, epoch milliseconds (above 1e11), or an RFC 3339 string; None
    when there is none or it does not parse."""
    if not payload:
        return None
    v: Any
    if payload[0] == 0x7B:  # "{"
        if b'"ts"' not in payload:
            return None
        m = _TS_RE.search(payload)
        if m is None:
            return None
        v = m.group(1).decode() if m.group(1) is not None else m.group(2).decode()
        if m.group(1) is not None:
            try:
                v = float(v)
            except ValueError:
                return None
    elif 0xA0 <= payload[0] <= 0xBF:  # CBOR map
        try:
            import cbor2

            obj = cbor2.loads(payload)
        except Exception:  # noqa: BLE001 - not a reading with a time
            return None
        v = obj.get("ts") if isinstance(obj, dict) else None
    else:
        return None
    if isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v) / 1000.0 if abs(v) > 1e11 else float(v)


def value_span(template: bytes) -> tuple[int, int]:
    """Where :func:`reading_value` finds the number in every payload whose whole
    ``payload.translate(TEMPLATE)`` is ``template``: ``(start, end)`` for the flat-JSON fast
    path (``float(payload[start:end])``, not finite -> None), :data:`NO_VALUE` when such
    payloads have no reading, :data:`PARSE` when each must be parsed.

    Exact because every test of the fast path is blind to which digit a byte is: a digit
    and its "0" match the same classes of the regex, and no other byte changes.
    """
    if not template:
        return NO_VALUE
    first = template[0]
    if first == 0x7B:
        if b'"value"' not in template and b"\\" not in template:
            return NO_VALUE
        if _flat_json(template):
            last = None
            for last in _VALUE_RE.finditer(template):  # noqa: B007 (the last one counts)
                pass
            if last is not None:
                return last.span(1)
        return PARSE
    if 0xA0 <= first <= 0xBF:
        return PARSE
    return NO_VALUE
