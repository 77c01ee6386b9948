"""The protocol's own exceptions.

Every problem with bytes that came from the network is a `ProtocolError`: a `ValueError` whose
message names the field, what was expected and what came, and whose `code` travels back to the
sender inside an ERROR message. Transport problems (no broker, refused, timed out) are separate
because the right reaction differs: fix the input versus retry or reconfigure.
"""

from __future__ import annotations

# Codes carried by ERROR messages; stable strings so that peers in any language can match them.
MALFORMED = "malformed"  # not a safetensors file, bad JSON, bad offsets
UNSUPPORTED_VERSION = "unsupported_version"  # newer than this peer knows, or nonsense
UNKNOWN_KIND = "unknown_kind"
BAD_FIELD = "bad_field"  # an envelope or body field is missing or out of range
BAD_DTYPE = "bad_dtype"
BAD_SHAPE = "bad_shape"
TOO_LARGE = "too_large"  # over a configured size limit
NOT_FINITE = "not_finite"  # NaN or Inf in a tensor
BAD_CHUNK = "bad_chunk"  # chunk set inconsistent or its hash does not match
INTERNAL = "internal"  # the receiver failed for a reason of its own; the sender did nothing wrong
# Well-formed messages the receiver's state refuses:
UNKNOWN_STEP = "unknown_step"  # GRAD_Z for a step the server never saw, already finished or expired
REJECTED = "rejected"  # an UPDATE that is late, duplicate, for another round or not selected
BUNDLE_MISMATCH = "bundle_mismatch"  # a JOIN whose bundle does not fit the server's model
BUSY = "busy"  # a budget or queue of the receiver is full for now: send it again later

CODES = frozenset(
    {
        MALFORMED,
        UNSUPPORTED_VERSION,
        UNKNOWN_KIND,
        BAD_FIELD,
        BAD_DTYPE,
        BAD_SHAPE,
        TOO_LARGE,
        NOT_FINITE,
        BAD_CHUNK,
        INTERNAL,
        UNKNOWN_STEP,
        REJECTED,
        BUNDLE_MISMATCH,
        BUSY,
    }
)


class ProtocolError(ValueError):
    """Bad protocol input: names the field, what was expected and what came."""

    def __init__(self, code: str, field: str, expected: str, got: object) -> None:
        self.code = code
        self.field = field
        self.expected = expected
        self.got = _short(got)
        super().__init__(f"[{code}] {field}: expected {expected}, got {self.got}")


class TransportError(ConnectionError):
    """The broker could not be reached, refused us, or did not answer in time.

    `permanent`: retrying with the same settings cannot help (unknown host, TLS refused, not
    authorised), so a device should stop and say so rather than retry forever."""

    def __init__(
        self, message: str, reason_code: int | None = None, permanent: bool = False
    ) -> None:
        self.reason_code = reason_code
        self.permanent = permanent
        super().__init__(message)


class RequestTimeout(TransportError, TimeoutError):
    """No reply arrived within the request's timeout."""


class RemoteError(RuntimeError):
    """The peer answered a request with an ERROR message (kept in `error`)."""

    def __init__(self, error: object) -> None:
        self.error = error
        code = getattr(error, "code", "?")
        text = getattr(error, "text", "")
        super().__init__(f"peer refused the request: [{code}] {text}")


def _short(value: object, limit: int = 120) -> str:
    """Render `value` for an error message without echoing megabytes of attacker input."""
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."
