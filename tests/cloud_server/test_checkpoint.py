"""Checkpoints: a round trip is bit-exact (random state included); damaged files are refused
naming the file; a server killed with SIGKILL mid-write always leaves a complete checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from sfprompt.cloud_server.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def _checkpoint(round: int = 4) -> Checkpoint:
    rng = np.random.default_rng(7)
    rng.standard_normal(3)  # move the state away from the seed
    special = np.array([0.0, -0.0, np.finfo(np.float32).tiny / 2, 3.4e38, 1 / 3], np.float32)
    params = {
        "prompt.tokens": rng.standard_normal((1, 10, 16)).astype(np.float32),
        "tail.norm.weight": special,
        "tail.head.weight": rng.standard_normal((16, 5)).astype(np.float32).T,  # not contiguous
        "tail.empty": np.zeros((0, 4), np.float32),
    }
    history = [
        {"round": 1, "accuracy": 0.1, "loss": 2.302585092994046, "rejected": [["a", "late"]]},
        {"round": 2, "accuracy": None, "loss": 1e-300, "devices": {"a": {"bytes_up_split": 3}}},
    ]
    return Checkpoint(
        round=round,
        params=params,
        history=history,
        rng_state=rng.bit_generator.state,
        fingerprint="ab" * 32,  # as the server writes it: the bundle's contract hash
    )


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    original = _checkpoint()
    save_checkpoint(path, original)
    back = load_checkpoint(path, fingerprint=original.fingerprint)
    assert back is not None
    assert back.round == original.round and back.fingerprint == original.fingerprint
    assert back.history == original.history
    assert set(back.params) == set(original.params)
    for key, value in original.params.items():
        assert back.params[key].dtype == value.dtype and back.params[key].shape == value.shape
        assert back.params[key].tobytes() == np.ascontiguousarray(value).tobytes()
    # The restored generator continues exactly where the saved one stopped.
    saved = np.random.default_rng()
    saved.bit_generator.state = original.rng_state
    restored = np.random.default_rng()
    restored.bit_generator.state = back.rng_state
    assert np.array_equal(saved.random(8), restored.random(8))
    assert [p.name for p in tmp_path.iterdir()] == ["server.safetensors"]  # no temp left behind


def test_absent_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "none.safetensors") is None


def test_other_configuration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    save_checkpoint(path, _checkpoint())
    other = "cd" * 32
    with pytest.raises(CheckpointError, match="server.safetensors.*written for configuration"):
        load_checkpoint(path, fingerprint=other)


@pytest.mark.parametrize("keep", [0, 4, 20, -1, -100])
def test_truncated_file_is_refused(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "server.safetensors"
    save_checkpoint(path, _checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="server.safetensors"):
        load_checkpoint(path)


def _write_raw(path: Path, metadata: dict[str, str]) -> None:
    tensors = {"prompt.tokens": np.zeros((1, 2), np.float32)}
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({}, "no readable checkpoint metadata"),
        ({"sfprompt.checkpoint": "{not json"}, "no readable checkpoint metadata"),
        ({"sfprompt.checkpoint": json.dumps({"format": "other/9"})}, "expected format"),
        (
            {"sfprompt.checkpoint": json.dumps({"format": "sfprompt.checkpoint/1", "round": 1})},
            "field 'history' is missing",
        ),
        (
            {
                "sfprompt.checkpoint": json.dumps(
                    {
                        "format": "sfprompt.checkpoint/1",
                        "round": "3",
                        "history": [],
                        "rng_state": {},
                        "fingerprint": "x",
                    }
                )
            },
            "field 'round' must be int, got str",
        ),
    ],
)
def test_bad_metadata_is_refused(tmp_path: Path, metadata: dict[str, str], message: str) -> None:
    path = tmp_path / "server.safetensors"
    _write_raw(path, metadata)
    with pytest.raises(CheckpointError, match=f"server.safetensors.*{message}"):
        load_checkpoint(path)


def test_unserialisable_history_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    bad = _checkpoint()
    bad.history = [{"when": object()}]
    with pytest.raises(ValueError, match="not JSON-able"):
        save_checkpoint(path, bad)
    assert list(tmp_path.iterdir()) == []


def test_leftover_temp_file_is_ignored_then_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    save_checkpoint(path, _checkpoint(round=4))
    newer = tmp_path / "newer.safetensors"
    save_checkpoint(newer, _checkpoint(round=5))
    # What a write killed halfway leaves: a partial temp file next to the complete checkpoint.
    stale = tmp_path / ".server.safetensors.k1ll3d.tmp"
    stale.write_bytes(newer.read_bytes()[:1000])
    back = load_checkpoint(path)
    assert back is not None and back.round == 4
    save_checkpoint(path, _checkpoint(round=6))
    assert not stale.exists()
    back = load_checkpoint(path)
    assert back is not None and back.round == 6


# The child saves ~50 MB checkpoints in a loop; every value in round r's params equals r and its
# history has r entries, so a mix of two versions or a partial one would be caught.
_CHILD = """
import sys
from pathlib import Path
import numpy as np
from sfprompt.cloud_server.checkpoint import Checkpoint, save_checkpoint
path, r = Path(sys.argv[1]), int(sys.argv[2])
while True:
    r += 1
    params = {"prompt.tokens": np.full((6_250_000,), r, np.float32),
              "tail.head.weight": np.full((6_250_000,), -r, np.float32)}
    history = [{"round": i} for i in range(1, r + 1)]
    save_checkpoint(path, Checkpoint(r, params, history, {"r": r}, "fp"))
"""


def _assert_complete(ckpt: Checkpoint | None) -> int:
    assert ckpt is not None
    r = ckpt.round
    assert ckpt.rng_state == {"r": r} and ckpt.fingerprint == "fp"
    assert ckpt.history == [{"round": i} for i in range(1, r + 1)]
    assert ckpt.params["prompt.tokens"].shape == (6_250_000,)
    assert (ckpt.params["prompt.tokens"] == r).all()
    assert (ckpt.params["tail.head.weight"] == -r).all()
    return r


def _version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    temps = f".{path.name}.*.tmp"
    rng = random.Random(1234)
    last, kills, mid_write = 0, 0, 0
    # Keep killing until at least 3 kills landed while a temp file was being written.
    while (kills < 6 or mid_write < 3) and kills < 40:
        before = _version(path)
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(last)])
        try:
            give_up = time.monotonic() + 30
            while _version(path) in (before, None):  # until the child has saved once
                assert child.poll() is None, "the writer died on its own"
                assert time.monotonic() < give_up, "the writer saved nothing in 30 s"
                time.sleep(0.005)
            if kills % 2:  # every other kill aims at a write: wait for its temp file first
                while not list(tmp_path.glob(temps)) and time.monotonic() < give_up:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                time.sleep(rng.uniform(0.0, 0.4))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
        kills += 1
        mid_write += bool(list(tmp_path.glob(temps)))
        r = _assert_complete(load_checkpoint(path))
        assert r > last  # the new save, never an older one
        last = r
    print(f"{kills} kills, {mid_write} during a write, last round {last}")
    assert mid_write >= 3, f"only {mid_write} of {kills} kills landed during a write"
    save_checkpoint(path, Checkpoint(last + 1, {}, [], {}, "fp"))  # a restart cleans up temps
    assert list(tmp_path.glob(temps)) == []


def test_strikes_and_exclusions_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "server.safetensors"
    original = _checkpoint()
    original.strikes, original.excluded = {"cam-02": 2}, ["evil"]
    save_checkpoint(path, original)
    back = load_checkpoint(path)
    assert back is not None and back.strikes == {"cam-02": 2} and back.excluded == ["evil"]


def test_checkpoint_without_strikes_loads_with_none(tmp_path: Path) -> None:
    """Checkpoints written before robust aggregation lack the fields: nobody is excluded."""
    path = tmp_path / "server.safetensors"
    meta = {"format": "sfprompt.checkpoint/1", "round": 2, "history": [], "rng_state": {}}
    _write_raw(path, {"sfprompt.checkpoint": json.dumps({**meta, "fingerprint": "x"})})
    back = load_checkpoint(path)
    assert back is not None and back.strikes == {} and back.excluded == []
    bad = {**meta, "fingerprint": "x", "strikes": {"a": -1}}
    _write_raw(path, {"sfprompt.checkpoint": json.dumps(bad)})
    with pytest.raises(CheckpointError, match="strikes must map device ids to counts"):
        load_checkpoint(path)


def test_a_non_finite_model_is_never_saved_nor_resumed(tmp_path: Path) -> None:
    """A NaN model saved would poison every restart: refused on both sides, naming the key."""
    path = tmp_path / "server.safetensors"
    poisoned = _checkpoint()
    poisoned.params["prompt.tokens"] = np.full((1, 10, 16), np.nan, np.float32)
    with pytest.raises(ValueError, match="prompt.tokens of round 4 is not finite"):
        save_checkpoint(path, poisoned)
    assert not path.exists()
    meta = {"format": "sfprompt.checkpoint/1", "round": 2, "history": [], "rng_state": {}}
    tensors = {"prompt.tokens": np.array([[1.0, np.inf]], np.float32)}
    text = json.dumps({**meta, "fingerprint": "x"})
    path.write_bytes(safetensors.numpy.save(tensors, metadata={"sfprompt.checkpoint": text}))
    with pytest.raises(CheckpointError, match=r"parameters \['prompt.tokens'\] hold NaN or Inf"):
        load_checkpoint(path)
