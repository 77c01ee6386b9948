"""Codec: every kind round-trips in every encoding, golden bytes hold, and bad input is refused
with a ProtocolError that names the problem."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from protocol_fixtures import assert_same, sample_messages

from sfprompt.protocol import errors
from sfprompt.protocol.bundle import BATCH, TensorSpec
from sfprompt.protocol.codec import (
    KINDS,
    Expectations,
    decode,
    encode,
    error_for,
    peek,
)
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import ENCODINGS, Smashed, Task, Update
from sfprompt.protocol.wire import Limits, RawTensor, pack

GOLDEN = Path(__file__).parent / "golden"
TOLERANCE = {"fp32": 0.0, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_kind_round_trips_in_every_encoding(encoding: str) -> None:
    """decode(encode(m)) equals m for all kinds; lossy encodings stay within their error bound."""
    messages = sample_messages(encoding)
    assert {m.kind for m in messages} | {"chunk"} == set(KINDS)
    for message in messages:
        back = decode(encode(message))
        assert_same(message, back, atol=TOLERANCE[encoding])
        assert peek(encode(message)).msg_id == message.msg_id


@pytest.mark.parametrize("kind", [m.kind for m in sample_messages()])
def test_golden_bytes(kind: str) -> None:
    """The bytes of each kind are stable; a layout change must come with a version bump.

    Regenerate with SFPROMPT_REGEN_GOLDEN=1 after a deliberate change.
    """
    message = next(m for m in sample_messages() if m.kind == kind)
    path = GOLDEN / f"{kind}.safetensors"
    if os.environ.get("SFPROMPT_REGEN_GOLDEN"):
        path.write_bytes(encode(message))
    assert encode(message) == path.read_bytes()
    assert_same(message, decode(path.read_bytes()))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_official_safetensors_reader_opens_messages(encoding: str) -> None:
    """Any safetensors reader opens a captured payload: tensors and the envelope metadata."""
    for message in sample_messages(encoding):
        data = encode(message)
        if encoding != "bf16":
            safetensors.numpy.load(data)  # numpy has no bf16; the generic reader below has
        tensors = dict(safetensors.deserialize(data))
        header_len = int.from_bytes(data[:8], "little")
        assert data[8 : 8 + header_len].startswith(b'{"__metadata__"')
        if isinstance(message, Smashed):
            assert tensors["h"]["dtype"] == {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}.get(
                encoding, "I8"
            )


def test_official_writer_output_decodes() -> None:
    """A payload written by safetensors itself (another implementation) decodes."""
    h = np.ones((2, 3, 4), np.float32)
    meta = {"version": "1", "kind": "smashed", "msg_id": "abc", "device_id": "d1", "round": "0"}
    meta |= {"step": "0", "encoding": "fp32"}
    message = decode(safetensors.numpy.save({"h": h}, metadata=meta))
    assert isinstance(message, Smashed) and message.h.shape == (2, 3, 4)


def test_fp32_is_within_one_percent_of_tensor_bytes_and_zero_copy() -> None:
    """Bytes on the wire / tensor bytes <= 1.01 at 1 MB; decode returns a view, not a copy."""
    h = np.zeros((1, 256, 1024), np.float32)  # 1 MiB
    data = encode(Smashed(device_id="d", h=h))
    assert len(data) / h.nbytes <= 1.01
    back = decode(data)
    assert isinstance(back, Smashed) and not back.h.flags.owndata


def test_int8_keeps_small_rows_precise() -> None:
    """Per-row scales: a row of tiny values next to a row of large ones keeps its resolution."""
    g = np.stack([np.linspace(-1e-4, 1e-4, 64), np.linspace(-100, 100, 64)]).astype(np.float32)
    back = decode(encode(Smashed(device_id="d", h=g, encoding="int8")))
    assert isinstance(back, Smashed)
    assert np.abs(back.h[0] - g[0]).max() <= 1e-4 / 127
    assert np.abs(back.h[1] - g[1]).max() <= 100 / 127


def _smashed_bytes(meta_changes: dict[str, str] | None = None, **tensors: RawTensor) -> bytes:
    meta = {"version": "1", "kind": "smashed", "msg_id": "abc", "device_id": "d1", "round": "0"}
    meta |= {"step": "0", "encoding": "fp32"} | (meta_changes or {})
    return pack(tensors or {"h": RawTensor("F32", np.ones((2, 3), np.float32))}, meta)


@pytest.mark.parametrize(
    ("data", "code", "field"),
    [
        (b"", errors.MALFORMED, "payload"),
        (b"\xff" * 8 + b"{}", errors.MALFORMED, "header length"),
        (_smashed_bytes({"version": "2"}), errors.UNSUPPORTED_VERSION, "version"),
        (_smashed_bytes({"version": "x"}), errors.BAD_FIELD, "version"),
        (_smashed_bytes({"kind": "teleport"}), errors.UNKNOWN_KIND, "kind"),
        (_smashed_bytes({"encoding": "fp8"}), errors.BAD_DTYPE, "encoding"),
        (_smashed_bytes({"device_id": "a/b"}), errors.BAD_FIELD, "device_id"),
        (_smashed_bytes({"round": "-1"}), errors.BAD_FIELD, "round"),
        (_smashed_bytes({"extra": "1"}), errors.MALFORMED, "__metadata__"),
        (_smashed_bytes(h=RawTensor("F16", np.ones(3, np.float16))), errors.BAD_DTYPE, "h"),
        (_smashed_bytes(z=RawTensor("F32", np.ones(3, np.float32))), errors.BAD_SHAPE, "tensors"),
        (
            _smashed_bytes(h=RawTensor("F32", np.array([1.0, np.nan], np.float32))),
            errors.NOT_FINITE,
            "h",
        ),
        (
            _smashed_bytes(h=RawTensor("F32", np.array([np.inf], np.float32))),
            errors.NOT_FINITE,
            "h",
        ),
        (_smashed_bytes()[:-1], errors.MALFORMED, "data"),
        (_smashed_bytes() + b"\0", errors.MALFORMED, "data"),
    ],
)
def test_bad_input_is_refused_by_name(data: bytes, code: str, field: str) -> None:
    """Each defect raises ProtocolError with the right code and the offending field named."""
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == code
    assert info.value.field == field
    assert field in str(info.value) and "expected" in str(info.value)


def test_size_limit() -> None:
    data = encode(Smashed(device_id="d", h=np.zeros((4, 1024), np.float32)))
    with pytest.raises(ProtocolError, match="too_large"):
        decode(data, Limits(max_payload_bytes=1000))


def test_expectations_from_manifest() -> None:
    """Shapes and parameter names are checked against what the bundle manifest promises."""
    expect = Expectations(
        {
            "smashed": (TensorSpec("h", "float32", (BATCH, 7, 8)),),
            "task": tuple(
                TensorSpec(k, "float32", v.shape) for k, v in sample_messages()[1].params.items()
            ),
        }
    )
    messages = sample_messages()
    for message in messages:
        decode(encode(message), expect=expect)
    wrong = Smashed(device_id="d", h=np.zeros((2, 7, 9), np.float32))
    with pytest.raises(ProtocolError, match=r"bad_shape.*h: expected \(-1, 7, 8\)"):
        decode(encode(wrong), expect=expect)
    task = messages[1]
    assert isinstance(task, Task)
    fewer = Task(device_id="d", params={"prompt": task.params["prompt"]}, settings=task.settings)
    with pytest.raises(ProtocolError, match="params"):
        decode(encode(fewer), expect=expect)


def test_params_must_be_finite() -> None:
    bad = Update(device_id="d", params={"w": np.array([np.nan], np.float32)}, samples=1)
    with pytest.raises(ProtocolError, match="not_finite"):
        decode(encode(bad))


def test_constructors_check_invariants() -> None:
    """A message that exists may be sent: bad fields fail at construction."""
    with pytest.raises(ProtocolError, match="float32"):
        Smashed(device_id="d", h=np.zeros(3, np.float64))
    with pytest.raises(ProtocolError, match="encoding"):
        Smashed(device_id="d", h=np.zeros(3, np.float32), encoding="fp4")
    with pytest.raises(ProtocolError, match="device_id"):
        Smashed(device_id="+", h=np.zeros(3, np.float32))


def test_error_for_names_the_problem() -> None:
    """A refused payload is answered by an ERROR carrying the code and text of the failure."""
    try:
        decode(_smashed_bytes({"version": "9"}))
    except ProtocolError as exc:
        error = error_for(exc, "d1", answers="abc", round=2)
    assert error.code == errors.UNSUPPORTED_VERSION and "version" in error.text
    assert error.answers == "abc" and error.round == 2
    assert decode(encode(error)) == error
    internal = error_for(RuntimeError("boom"), "d1")
    assert internal.code == errors.INTERNAL and "boom" in internal.text


def test_settings_name_an_unknown_prune_mode() -> None:
    from sfprompt.protocol.messages import PhaseSettings

    with pytest.raises(ProtocolError, match="settings.prune"):
        PhaseSettings(
            keep_ratio=0.5, local_epochs=1, local_lr=1e-4, split_lr=0.1, deadline=1.7e9,
            split_epochs=1, batch_size=128, encoding="fp32", prune="easiest",
        )  # fmt: skip
