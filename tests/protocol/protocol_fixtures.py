"""Helpers shared by the protocol tests: sample messages of every kind and their comparison."""

from __future__ import annotations

from typing import Any

import numpy as np

from sfprompt.protocol.messages import (
    BodyOut,
    Error,
    GradH,
    GradZ,
    Join,
    Message,
    PhaseSettings,
    Presence,
    ServerStatus,
    Smashed,
    Task,
    Update,
)
from sfprompt.protocol.pool_messages import WorkerAssignment, WorkerPresence


def sample_messages(encoding: str = "fp32", seed: int = 0) -> list[Message]:
    """One message of every kind with fixed ids, small enough for golden files."""
    rng = np.random.default_rng(seed)
    env: dict[str, Any] = {"device_id": "cam-01", "round": 3, "step": 7}

    def act(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    params = {"prompt": act(1, 4, 8), "tail.head.weight": act(10, 8), "tail.head.bias": act(10)}
    settings = PhaseSettings(
        keep_ratio=0.5, local_epochs=1, local_lr=1e-4, split_lr=0.1, deadline=1.7e9,
        split_epochs=1, batch_size=128, encoding="fp32", prune="class",
    )  # fmt: skip
    return [
        Join(
            msg_id="m-join",
            bundle_hash="ab" * 32,
            runtime={"python": "3.11.7", "onnxruntime": "1.17.1"},
            hardware={"cpu_count": 4, "memory_total": 8e9, "machine": "aarch64"},
            **env,
        ),
        Task(msg_id="m-task", params=params, settings=settings, **env),
        Smashed(msg_id="m-smashed", h=act(2, 7, 8), encoding=encoding, **env),
        BodyOut(msg_id="m-body-out", z=act(2, 1, 8), encoding=encoding, **env),
        GradZ(msg_id="m-grad-z", grad_z=act(2, 1, 8), encoding=encoding, **env),
        GradH(msg_id="m-grad-h", grad_h=act(2, 7, 8), encoding=encoding, **env),
        Update(
            msg_id="m-update",
            params=params,
            samples=250,
            metrics={"loss": 0.25, "accuracy": 0.875},
            memory={"peak_rss_bytes": 1.5e8},
            **env,
        ),
        Error(
            msg_id="m-error", code="bad_shape", text="h: expected (-1, 7, 8)", answers="m-x", **env
        ),
        Presence(msg_id="m-presence", online=True, since=1.7e9, **env),
        ServerStatus(msg_id="m-status", device_id="*", round=3, state="training", devices_online=2),
        WorkerPresence(
            msg_id="m-worker", device_id="gpu-1", online=True, capacity=2.0, accelerator="cuda"
        ),
        WorkerAssignment(msg_id="m-assign", device_id="gpu-1", round=3, devices=("cam-01", "pi-2")),
    ]


def assert_same(a: Message, b: Message, atol: float = 0.0) -> None:
    """Field-by-field equality; arrays within `atol` (lossy encodings)."""
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert value.shape == other.shape and value.dtype == other.dtype, name
            np.testing.assert_allclose(other, value, atol=atol, rtol=0, err_msg=name)
        elif name == "params":
            assert set(value) == set(other)
            for key in value:
                np.testing.assert_array_equal(other[key], value[key])
        else:
            assert value == other, name
