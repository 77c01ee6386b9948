"""The TorchScript runtime computes what the onnx runtime does, graph by graph and step by step."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sfprompt.edge_client.local_step import local_step
from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime
from sfprompt.edge_client.runtime import open_runtime, synthetic_batch
from sfprompt.edge_client.tail_input import select
from sfprompt.edge_client.torchscript_runtime import TorchScriptDeviceRuntime
from sfprompt.export.split_vit import PROMPT_KEY
from sfprompt.protocol.bundle import BundleError
from tests.bundles import ExportedCases

# One tail block, mean pooling: the tail twins take 16 parameters, so their order matters.
CASE = "avg_m1"
RTOL = 1e-4


@pytest.fixture(scope="module")
def bundle(exported_cases: ExportedCases) -> Path:
    return exported_cases[CASE].result.device_dir


def assert_close(got: np.ndarray, want: np.ndarray, what: str, rtol: float = RTOL) -> None:
    """Agree within `rtol` of the largest magnitude (elementwise rtol is meaningless near 0)."""
    assert got.shape == want.shape, what
    scale = max(float(np.abs(want).max()), 1e-12)
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def test_open_runtime_by_name(bundle: Path) -> None:
    runtime = open_runtime(bundle, "torchscript", threads=1, micro_batch=2)
    assert isinstance(runtime, TorchScriptDeviceRuntime)
    assert runtime.micro_batch == 2
    assert runtime.tail_keys == OnnxDeviceRuntime(bundle).tail_keys


def test_each_graph_output_matches_onnx(bundle: Path) -> None:
    """Same inputs -> same outputs of all four graphs, every output of tail_step by name.

    Batch 5 with micro-batch 2 on the TorchScript side: a partial last micro-batch too.
    """
    ts = TorchScriptDeviceRuntime(bundle, threads=1, micro_batch=2)
    ox = OnnxDeviceRuntime(bundle, threads=1, micro_batch=None)
    params = ox.initial_parameters()
    rng = np.random.default_rng(1)
    params = {
        k: v + 0.05 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()
    }
    images, labels = synthetic_batch(ox, 5, seed=1)
    weight = np.array([1, 1, 0.5, 0, 2], dtype=np.float32)
    prompt = params[PROMPT_KEY]

    h = ox.head_forward(images, prompt)
    assert_close(ts.head_forward(images, prompt), h, "head_forward h")
    grad_h = rng.standard_normal(h.shape, dtype=np.float32)
    _, ts_tape = ts.head_forward_taped(images, prompt)
    _, ox_tape = ox.head_forward_taped(images, prompt)
    assert ts_tape.saved is None and ox_tape.saved is not None  # recomputed / kept
    assert_close(ts.head_vjp(ts_tape, grad_h), ox.head_vjp(ox_tape, grad_h), "grad_prompt")
    t = select(h, ox.manifest)
    want, got = ox.tail_step(params, t, labels, weight), ts.tail_step(params, t, labels, weight)
    assert got.loss == pytest.approx(want.loss, rel=RTOL)
    assert_close(got.logits, want.logits, "tail_step logits")
    assert_close(got.grad_input, want.grad_input, "tail_step grad_tail_input")
    assert list(got.grads) == list(want.grads) == ts.tail_keys
    for key in ts.tail_keys:
        assert np.abs(want.grads[key]).max() > 0, f"{key}: a zero gradient proves nothing"
        assert_close(got.grads[key], want.grads[key], f"tail_step grad.{key}")
    assert_close(ts.tail_forward(params, t), ox.tail_forward(params, t), "tail_forward logits")


def test_local_steps_from_the_same_start_agree(bundle: Path) -> None:
    """Several SGD steps of the local loss leave the same prompt and tail on either runtime."""
    runtimes = [
        OnnxDeviceRuntime(bundle, threads=1, micro_batch=4),
        TorchScriptDeviceRuntime(bundle, threads=1, micro_batch=2),
    ]
    start = runtimes[0].initial_parameters()
    states = [{k: v.copy() for k, v in start.items()} for _ in runtimes]
    images, labels = synthetic_batch(runtimes[0], 6, seed=2)
    weight = np.ones(6, dtype=np.float32)
    losses: list[list[float]] = [[], []]
    for _ in range(4):
        for runtime, state, trace in zip(runtimes, states, losses):
            trace.append(local_step(runtime, state, images, labels, weight, lr=0.05).loss)
    np.testing.assert_allclose(losses[1], losses[0], rtol=RTOL)
    assert losses[0][-1] < losses[0][0], "the steps should have trained something"
    onnx_state, ts_state = states
    for key in start:
        assert_close(ts_state[key], onnx_state[key], key)
        # Stricter: the change itself agrees, not just the parameters it was added to.
        update = onnx_state[key] - start[key]
        assert np.abs(update).max() > 1e-6, f"{key} did not move"
        assert_close(ts_state[key] - start[key], update, f"update of {key}", rtol=1e-3)


def test_inputs_are_checked_against_the_manifest(bundle: Path) -> None:
    runtime = TorchScriptDeviceRuntime(bundle, threads=1)
    params = runtime.initial_parameters()
    prompt = params[PROMPT_KEY]
    with pytest.raises(BundleError, match="image: expected shape"):
        runtime.head_forward(np.zeros((2, 3, 31, 32), np.float32), prompt)
    with pytest.raises(BundleError, match="prompt: expected dtype float32"):
        runtime.head_forward(np.zeros((2, 3, 32, 32), np.float32), prompt.astype(np.float64))
    t = np.zeros((2, *runtime.manifest.tail_input.shape[1:]), np.float32)
    labels, weight = np.zeros(2, np.int64), np.ones(2, np.float32)
    with pytest.raises(BundleError, match="labels: expected dtype int64"):
        runtime.tail_step(params, t, labels.astype(np.int32), weight)
    missing = {k: v for k, v in params.items() if k != runtime.tail_keys[3]}
    with pytest.raises(BundleError, match=f"input {runtime.tail_keys[3]} was not given"):
        runtime.tail_forward(missing, t)


def test_a_corrupt_twin_is_refused_before_torch_loads_it(bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(bundle, tmp_path / "device")
    twin = copy / "tail_step.pt"
    data = bytearray(twin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    twin.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tail_step.pt is corrupt"):
        TorchScriptDeviceRuntime(copy)
