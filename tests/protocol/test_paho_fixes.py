"""The property-parser fix parses exactly what paho's own parser does, valid or malformed, and no
longer copies the payload that follows the properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import sfprompt.protocol.mqtt_client  # noqa: F401  (installs the fix)
from sfprompt.protocol import paho_fixes

ORIGINAL = Properties.unpack.__wrapped_original__  # type: ignore[attr-defined]
SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _outcome(unpack: Any, buffer: bytes) -> tuple[str, Any]:
    """What unpacking yields: the attributes set and the length consumed, or the error."""
    props = Properties(PacketTypes.PUBLISH)
    try:
        _, consumed = unpack(props, buffer)
    except Exception as exc:
        return "raised", (type(exc).__name__, str(exc))
    return "parsed", (sorted(vars(props).items(), key=lambda kv: kv[0]), consumed)


def test_fix_is_installed_once() -> None:
    paho_fixes.install()
    assert Properties.unpack is not ORIGINAL
    assert Properties.unpack.__wrapped_original__ is ORIGINAL  # type: ignore[attr-defined]


@SETTINGS
@given(
    correlation=st.binary(max_size=40),
    response=st.text(max_size=40).filter(lambda t: "\x00" not in t),
    content_type=st.sampled_from(["", "application/vnd.sfprompt+safetensors"]),
    expiry=st.integers(0, 2**32 - 1),
    user=st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
    payload=st.binary(max_size=64),
)
def test_valid_properties_parse_alike(
    correlation: bytes,
    response: str,
    content_type: str,
    expiry: int,
    user: list[tuple[str, str]],
    payload: bytes,
) -> None:
    props = Properties(PacketTypes.PUBLISH)
    if correlation:
        props.CorrelationData = correlation
    if response:
        props.ResponseTopic = response
    if content_type:
        props.ContentType = content_type
    props.MessageExpiryInterval = expiry
    for pair in user:
        props.UserProperty = pair
    buffer = bytes(props.pack()) + payload
    assert _outcome(Properties.unpack, buffer) == _outcome(ORIGINAL, buffer)


@SETTINGS
@given(st.binary(max_size=96))
def test_malformed_buffers_fail_alike(buffer: bytes) -> None:
    assert _outcome(Properties.unpack, buffer) == _outcome(ORIGINAL, buffer)


@pytest.mark.parametrize("size", [1 << 20])
def test_payload_after_the_properties_is_not_read(size: int) -> None:
    """The fixed parser sees only the property section (plus slack), whatever follows it."""
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"abc"
    props.ResponseTopic = "sfp/v1/dev/cam-01/down/body_out"
    seen: list[int] = []

    def spy(self: Properties, buffer: Any) -> Any:
        seen.append(len(buffer))
        return ORIGINAL(self, buffer)

    section = bytes(props.pack())
    paho_fixes._original_unpack, saved = spy, paho_fixes._original_unpack
    try:
        Properties(PacketTypes.PUBLISH).unpack(section + bytes(size))
    finally:
        paho_fixes._original_unpack = saved
    assert seen == [len(section) + paho_fixes._SLACK]
