"""The TASK carries the devices' defense settings: they round-trip, bad values are refused by
name, and a TASK of before the defenses (no such keys) still parses, as "no defense"."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from protocol_fixtures import sample_messages

from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import PhaseSettings, Task

GOLDEN_TASK = Path(__file__).parent / "golden" / "task.safetensors"
DEFENSE = {
    "defense_clip": 2.5,
    "defense_noise": 0.75,
    "defense_grad_noise": 4.0,
    "defense_grad_max_norm": True,
}


def _task(**defense: object) -> Task:
    task = next(m for m in sample_messages() if isinstance(m, Task))
    settings = dataclasses.replace(task.settings, **defense)  # type: ignore[arg-type]
    return dataclasses.replace(task, settings=settings)


def _metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])["__metadata__"]


def _payload_with_settings(settings: dict[str, object], raw: str | None = None) -> bytes:
    """A TASK as another writer would send it: the settings JSON as given."""
    meta = _metadata(GOLDEN_TASK.read_bytes())
    meta["settings"] = raw if raw is not None else json.dumps(settings)
    tensors = {"params/prompt": np.zeros((1, 4, 8), np.float32)}
    return safetensors.numpy.save(tensors, metadata=meta)


def test_the_defense_round_trips_in_a_task() -> None:
    back = decode(encode(_task(**DEFENSE)))
    assert isinstance(back, Task)
    for name, value in DEFENSE.items():
        assert getattr(back.settings, name) == value, name


def test_a_task_without_a_defense_carries_no_defense_key() -> None:
    """So a device of before the defenses reads it (it refuses unknown keys)."""
    settings = json.loads(_metadata(encode(_task()))["settings"])
    assert not [k for k in settings if k.startswith("defense_")]
    partial = json.loads(_metadata(encode(_task(defense_grad_noise=1.0)))["settings"])
    assert [k for k in partial if k.startswith("defense_")] == ["defense_grad_noise"]


def test_an_older_task_parses_as_no_defense() -> None:
    """The golden TASK was written before the defenses existed."""
    settings = json.loads(_metadata(GOLDEN_TASK.read_bytes())["settings"])
    assert not [k for k in settings if k.startswith("defense_")]
    task = decode(GOLDEN_TASK.read_bytes())
    assert isinstance(task, Task)
    assert task.settings.defense_clip is None
    assert task.settings.defense_noise == task.settings.defense_grad_noise == 0.0
    assert task.settings.defense_grad_max_norm is False


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"defense_clip": float("nan")}, "settings.defense_clip"),
        ({"defense_clip": 0.0}, "settings.defense_clip"),
        ({"defense_clip": -1.0}, "settings.defense_clip"),
        ({"defense_clip": float("inf")}, "settings.defense_clip"),
        ({"defense_clip": 1.0, "defense_noise": -0.5}, "settings.defense_noise"),
        ({"defense_clip": 1.0, "defense_noise": float("nan")}, "settings.defense_noise"),
        ({"defense_noise": 1.0}, "settings.defense_noise"),  # sigma C needs a C
        ({"defense_grad_noise": -1.0}, "settings.defense_grad_noise"),
        ({"defense_grad_noise": float("inf")}, "settings.defense_grad_noise"),
        ({"defense_grad_max_norm": 1}, "settings.defense_grad_max_norm"),
    ],
)
def test_bad_defense_values_are_refused_by_name(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        _task(**changes)


def test_bad_defense_values_from_the_wire_are_refused_by_name() -> None:
    settings = json.loads(_metadata(GOLDEN_TASK.read_bytes())["settings"])
    with pytest.raises(ProtocolError, match="settings.defense_clip"):
        decode(_payload_with_settings({**settings, "defense_clip": -2.0}))
    with pytest.raises(ProtocolError, match="settings.defense_grad_noise"):
        decode(_payload_with_settings({**settings, "defense_grad_noise": "1"}))
    nan = json.dumps({**settings, "defense_clip": 1.0}).replace("1.0}", "NaN}")
    assert "NaN" in nan
    with pytest.raises(ProtocolError, match="settings"):
        decode(_payload_with_settings({}, raw=nan))  # JSON has no NaN: refused as unreadable
    good = decode(_payload_with_settings({**settings, "defense_clip": 3.0, "defense_noise": 2}))
    assert isinstance(good, Task) and good.settings.defense_clip == 3.0


def test_phase_settings_default_to_no_defense() -> None:
    settings = _task().settings
    assert isinstance(settings, PhaseSettings)
    assert (settings.defense_clip, settings.defense_noise) == (None, 0.0)
