"""The envelope every message carries, and the field checks messages share (messages.py for
the device protocol, pool_messages.py for the body-worker pool). A violation raises
`ProtocolError` naming the field."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import BAD_FIELD, ProtocolError
from .version import PROTOCOL_VERSION

BROADCAST = "*"
"""`device_id` of messages meant for every device (a TASK for all alike, the server status)."""

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MSG_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
MAX_INT = 2**53  # integers survive a round trip through any JSON reader
MAX_TEXT = 4096


def new_msg_id() -> str:
    """A fresh message id: random, so that two senders never collide without coordination."""
    return uuid.uuid4().hex


def check_device_id(value: object, field_name: str = "device_id") -> str:
    """Device ids become MQTT topic levels and broker user names: no wildcards, no slashes."""
    if not isinstance(value, str) or not DEVICE_ID.match(value):
        raise ProtocolError(
            BAD_FIELD, field_name, "1-64 chars of [A-Za-z0-9_.-], starting alphanumeric", value
        )
    return value


def check_int(value: object, name: str, low: int = 0, high: int = MAX_INT) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(BAD_FIELD, name, f"an integer in [{low}, {high}]", value)


def check_float(value: object, name: str, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high  # type: ignore[operator]
    if not ok:
        bracket = "(" if low_open else "["
        raise ProtocolError(BAD_FIELD, name, f"a finite number in {bracket}{low}, {high}]", value)


def check_text(value: object, name: str, allow_empty: bool = True) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT or (not allow_empty and not value):
        raise ProtocolError(BAD_FIELD, name, f"a string of at most {MAX_TEXT} chars", value)


def check_mapping(value: object, name: str, values: str) -> None:
    """Flat string-keyed maps of "text", finite "number" or either ("scalar", bools included)."""
    if not isinstance(value, Mapping):
        raise ProtocolError(BAD_FIELD, name, "a mapping", type(value).__name__)
    if len(value) > 1024:
        raise ProtocolError(BAD_FIELD, name, "at most 1024 entries", len(value))
    for key, item in value.items():
        check_text(key, f"{name} key", allow_empty=False)
        if isinstance(item, str) and values != "number":
            check_text(item, f"{name}[{key}]")
        elif not (isinstance(item, bool) and values == "scalar") and values != "text":
            check_float(item, f"{name}[{key}]", -math.inf, math.inf)
        elif values == "text":
            raise ProtocolError(BAD_FIELD, f"{name}[{key}]", "a string", item)


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """Fields every message carries; `(device_id, msg_id)` identifies it for de-duplication."""

    kind: ClassVar[str] = ""
    device_id: str
    round: int = 0
    step: int = 0
    msg_id: str = field(default_factory=new_msg_id)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        check_int(self.version, "version", 1, PROTOCOL_VERSION)
        if not isinstance(self.msg_id, str) or not MSG_ID.match(self.msg_id):
            raise ProtocolError(BAD_FIELD, "msg_id", "1-64 chars of [A-Za-z0-9_-]", self.msg_id)
        if self.device_id != BROADCAST:
            check_device_id(self.device_id)
        check_int(self.round, "round")
        check_int(self.step, "step")
