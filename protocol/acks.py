"""Waiting for the broker's acknowledgements, filed by paho's public callbacks.

paho's network thread calls `on_publish` and `on_subscribe`; the threads that published or
subscribed wait here for the reason code of their own packet id. Packet ids are 16 bits and wrap,
so neither table grows beyond 65,535 entries.
"""

from __future__ import annotations

import threading
from typing import Any


class PubAcks:
    """PUBACK reason codes by packet id, from paho's `on_publish`.

    Not paho's `MQTTMessageInfo.is_published()`: it raises for a message published while
    disconnected (rc NO_CONN) even after paho has sent it on reconnect and the broker has
    acknowledged it. paho reuses a packet id only once its message is acknowledged, so an id
    has at most one PUBACK to come, which may arrive before `publish` has even returned the id.
    Only PUBACKs someone will take are kept: a publisher that does not wait says so (`ignore`);
    one that gave up waiting leaves its PUBACK to be dropped on arrival.
    """

    def __init__(self) -> None:
        self._filed = threading.Condition()
        self._acks: dict[int, Any] = {}  # packet id -> reason code, until taken
        self._unwanted: set[int] = set()  # packet ids whose PUBACK nobody will take

    def on_puback(self, mid: int, reason: Any) -> None:
        """File a PUBACK (called on paho's network thread: never blocks for long)."""
        with self._filed:
            if mid in self._unwanted:
                self._unwanted.discard(mid)
                return
            self._acks[mid] = reason
            self._filed.notify_all()

    def wait(self, mid: int, timeout: float) -> Any | None:
        """The reason code of the PUBACK for `mid`; None if none came within `timeout` s."""
        with self._filed:
            if self._filed.wait_for(lambda: mid in self._acks, timeout):
                return self._acks.pop(mid)
            self._unwanted.add(mid)
            return None

    def ignore(self, mids: list[int]) -> None:
        """Keep no PUBACK for `mids`, whether it has come already or not."""
        with self._filed:
            for mid in mids:
                if mid in self._acks:
                    del self._acks[mid]
                else:
                    self._unwanted.add(mid)


class SubAcks:
    """SUBACK reason codes of the SUBSCRIBEs someone waits for, from paho's `on_subscribe`.

    Hold `lock` from sending the SUBSCRIBE until its packet id is `expect`ed, so that its SUBACK
    cannot be filed first and lost; `wait` with the lock still held (it releases it meanwhile).
    """

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._codes: dict[int, list[Any] | None] = {}  # packet id -> codes, None until SUBACK

    def expect(self, mid: int) -> None:
        """Keep the SUBACK for `mid` (with `lock` held)."""
        self._codes[mid] = None

    def on_suback(self, mid: int, codes: list[Any]) -> bool:
        """File a SUBACK; False if nobody expects `mid` (a resubscription after a reconnect)."""
        with self.lock:
            if mid not in self._codes:
                return False
            self._codes[mid] = list(codes)
            self.lock.notify_all()
            return True

    def wait(self, mid: int, timeout: float) -> list[Any] | None:
        """The reason codes for `mid` (with `lock` held), or None if no SUBACK came within
        `timeout` seconds; either way `mid` is no longer expected."""
        if not self.lock.wait_for(lambda: self._codes.get(mid) is not None, timeout):
            self._codes.pop(mid, None)
            return None
        return self._codes.pop(mid) or []
