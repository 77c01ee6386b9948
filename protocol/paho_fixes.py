"""A speed fix for paho-mqtt's MQTT v5 property parser, installed when `transport` is imported.

paho's `Properties.unpack(buffer)` is handed the rest of the whole PUBLISH packet (properties
and payload) and re-slices that buffer twice per property, so each property of a message copies
its payload twice: a 16 MB SMASHED with response topic, correlation data and content type was
copied six extra times on arrival, which cost 10-15% of round-trip throughput (measured by
`bench/bench_protocol.py` with the fix off and on).
The fix hands `unpack` only the property section (plus a few bytes of slack, so that a
malformed packet reads exactly the bytes it read before and fails the same way). What it
parses and what it returns are unchanged; `tests/protocol/test_paho_fixes.py` checks that
against the original on valid and malformed buffers. Remove this module once paho parses
properties without copying the payload.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt.properties import Properties, VariableByteIntegers

_SLACK = 4  # the longest fixed-size read (a four-byte integer or VBI) past the declared length


def _unpack_property_section(self: Properties, buffer: Any) -> Any:
    # A Variable Byte Integer has at most four bytes (and paho's decoder copies what it is
    # given once per byte), so the length is read from the first four.
    length, length_bytes = VariableByteIntegers.decode(buffer[:4])
    return _original_unpack(self, buffer[: length_bytes + length + _SLACK])


_original_unpack = getattr(Properties.unpack, "__wrapped_original__", Properties.unpack)


def install() -> None:
    """Idempotent; leaves the original reachable as `Properties.unpack.__wrapped_original__`."""
    if getattr(Properties.unpack, "__wrapped_original__", None) is None:
        _unpack_property_section.__wrapped_original__ = _original_unpack  # type: ignore[attr-defined]
        Properties.unpack = _unpack_property_section  # type: ignore[method-assign]
