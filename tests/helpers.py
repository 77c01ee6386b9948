"""Waiting in tests: the one way a test polls for something another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_for(
    condition: Callable[[], object], timeout: float = 30.0, what: str = "", poll_s: float = 0.05
) -> None:
    """Poll until `condition()` is truthy; fail the test naming `what` after `timeout` seconds.

    Polling (not events) because what is awaited is often in another process: a file written,
    a broker listening, a log line.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(poll_s)
