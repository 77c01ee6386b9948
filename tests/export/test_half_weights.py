"""fp16 head weights: half the bytes, the same function up to the weights' rounding, and a
runtime that keeps them fp16 in memory (onnxruntime would otherwise fold the casts away)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime, open_session, session_options
from sfprompt.export.bundle_writer import HEAD_GRAPHS
from sfprompt.export.half_weights import MIN_ELEMENTS, halve_weights
from sfprompt.export.split_vit import PROMPT_KEY
from sfprompt.protocol.bundle import HEAD_WEIGHTS_EXTRA
from tests.bundles import Exported, with_head_weights

ROUNDING_RTOL = 1e-2  # the stated tolerance against the fp32 model


@pytest.fixture(scope="module")
def half_bundle(exported_cases, tmp_path_factory) -> tuple[Exported, Path]:
    """The token_m0 bundle with its head graphs' weights halved, as `--head-weights fp16` does."""
    exported = exported_cases["token_m0"]
    out = tmp_path_factory.mktemp("half") / "device"
    return exported, with_head_weights(exported.result.device_dir, out, halve_weights, "fp16")


def rounded_head(exported: Exported) -> torch.nn.Module:
    """The eager head with every weight the exporter halves rounded to fp16 and back."""
    head = exported.split.head
    state = {
        k: (v.half().float() if v.is_floating_point() and v.numel() >= MIN_ELEMENTS else v)
        for k, v in head.state_dict().items()
    }
    rounded = copy.deepcopy(head)
    rounded.load_state_dict(state)
    return rounded


def test_the_halved_graphs_are_about_half_the_bytes(half_bundle) -> None:
    exported, out = half_bundle
    for name in HEAD_GRAPHS:
        before = (exported.result.device_dir / f"{name}.onnx").stat().st_size
        assert (out / f"{name}.onnx").stat().st_size < 0.6 * before, name
        onnx.checker.check_model(onnx.load(str(out / f"{name}.onnx")), full_check=True)


def test_the_runtime_keeps_the_weights_fp16_in_memory(half_bundle, tmp_path) -> None:
    _, out = half_bundle
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    open_session(out / "head_tape_forward.onnx", options, half_weights=True)
    kinds = {i.data_type for i in onnx.load(str(tmp_path / "optimized.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in kinds, "onnxruntime folded the fp16 weights to fp32"


def test_each_weight_is_cast_per_use_and_only_once_its_activation_exists(half_bundle) -> None:
    """A cast that reads initializers alone could run at the start of every call, and all the
    float32 copies would then live together: each must depend on a graph input."""
    _, out = half_bundle
    for name in HEAD_GRAPHS:
        graph = onnx.load(str(out / f"{name}.onnx")).graph
        from_inputs = {i.name for i in graph.input}
        halves = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
        casts, uses = 0, 0
        for node in graph.node:  # topological: a value's ancestry is known before its use
            if from_inputs.intersection(node.input):
                from_inputs.update(node.output)
            uses += sum(n in halves for n in node.input)
            if node.op_type == "Cast" and node.output[0].endswith(".fp32"):
                casts += 1
                assert node.output[0] in from_inputs, f"{name}: {node.output[0]} runs ungated"
        assert casts == uses > 0, name


def test_gradients_equal_autograd_through_the_rounded_head(half_bundle) -> None:
    """Exact (1e-4) against the head whose weights are rounded the same way; within the
    stated 1e-2 of the fp32 head, and measurably different from it (the rounding is there)."""
    exported, out = half_bundle
    runtime = OnnxDeviceRuntime(out, threads=1, micro_batch=2)
    assert runtime.keeps_tape
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    rng = np.random.default_rng(4)
    image = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    h, tape = runtime.head_forward_taped(image, prompt)
    grad_h = rng.standard_normal(h.shape, dtype=np.float32)
    grad_prompt = runtime.head_vjp(tape, grad_h)

    def eager(head: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        p = torch.from_numpy(prompt).clone().requires_grad_(True)
        out_h = head(torch.from_numpy(image), p)
        (g,) = torch.autograd.grad(out_h, p, torch.from_numpy(grad_h))
        return out_h.detach().numpy(), g.numpy()

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    h16, g16 = eager(rounded_head(exported))
    assert rel(h, h16) <= 1e-4 and rel(grad_prompt, g16) <= 1e-4
    h32, g32 = eager(exported.split.head)
    assert 1e-6 < rel(grad_prompt, g32) <= ROUNDING_RTOL
    assert rel(h, h32) <= ROUNDING_RTOL


@pytest.mark.slow
def test_export_with_fp16_head_weights_writes_a_bundle_the_runtime_opens(tmp_path) -> None:
    from tests.bundles import export_small_with_head_weights

    result = export_small_with_head_weights(tmp_path / "b", "fp16")
    assert result.device.extra[HEAD_WEIGHTS_EXTRA] == "fp16"
    for name in HEAD_GRAPHS:
        model = onnx.load(str(result.device_dir / result.device.graphs[name].onnx))
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    runtime = OnnxDeviceRuntime(result.device_dir, threads=1)
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    h, tape = runtime.head_forward_taped(np.zeros((2, 3, 32, 32), np.float32), prompt)
    assert np.isfinite(runtime.head_vjp(tape, np.ones_like(h))).all()
