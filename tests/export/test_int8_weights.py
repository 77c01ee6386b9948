"""int8 head weights: standard ONNX, a quarter of the weights' bytes, products that stay int8 in
the runtime, and h and the prompt's gradient within the stated tolerance of the fp32 head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime, open_session, session_options
from sfprompt.export.bundle_writer import HEAD_GRAPHS
from sfprompt.export.int8_weights import (
    fold_weight_transposes,
    quantize_weights,
    weight_products,
)
from sfprompt.export.split_vit import PROMPT_KEY
from sfprompt.protocol.bundle import HEAD_WEIGHTS_EXTRA, load_manifest
from tests.bundles import Exported, with_head_weights

# The stated tolerance against the fp32 head, relative to the largest entry: each product
# rounds its activation to 8 bits (measured at this cut: h ~1%, gradient ~2-3%).
H_RTOL = 5e-2
GRAD_RTOL = 1e-1
GRAD_COSINE = 0.99  # and the gradient keeps its direction


@pytest.fixture(scope="module")
def int8_bundle(exported_cases, tmp_path_factory) -> tuple[Exported, Path]:
    """The token_m0 bundle with its head graphs' weights in int8, as `--head-weights int8`."""
    exported = exported_cases["token_m0"]
    out = tmp_path_factory.mktemp("int8") / "device"
    return exported, with_head_weights(exported.result.device_dir, out, quantize_weights, "int8")


def test_every_weight_product_is_int8_and_the_graph_standard_onnx(int8_bundle) -> None:
    exported, out = int8_bundle
    for name in HEAD_GRAPHS:
        before = onnx.load(str(exported.result.device_dir / f"{name}.onnx"))
        fold_weight_transposes(before.graph)  # the backward's products by W^T count too
        after = onnx.load(str(out / f"{name}.onnx"))
        onnx.checker.check_model(after, full_check=True)
        assert {n.domain for n in after.graph.node} <= {"", "ai.onnx"}, name
        products = [n for n in after.graph.node if n.op_type == "MatMulInteger"]
        assert len(products) == len(weight_products(before.graph)) > 0, name
        assert not weight_products(after.graph), f"{name}: a float weight product is left"
        int8 = sum(i.data_type == onnx.TensorProto.INT8 for i in after.graph.initializer)
        assert int8 > 0, name
        assert (out / f"{name}.onnx").stat().st_size < (
            exported.result.device_dir / f"{name}.onnx"
        ).stat().st_size, name


def test_the_runtime_keeps_the_weights_int8_in_memory(int8_bundle, tmp_path) -> None:
    _, out = int8_bundle
    options = session_options(1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    open_session(out / "head_tape_forward.onnx", options, half_weights=False)
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    kinds = {i.data_type for i in graph.initializer if np.prod(i.dims) >= 4096}
    assert onnx.TensorProto.INT8 in kinds and onnx.TensorProto.FLOAT not in {
        i.data_type for i in graph.initializer if len(i.dims) == 2 and np.prod(i.dims) >= 4096
    }, "onnxruntime turned an int8 weight back into a float matrix"


def test_h_and_gradient_stay_within_the_stated_tolerance_of_the_fp32_head(int8_bundle) -> None:
    """Within the stated tolerance, and measurably different (the rounding is there)."""
    exported, out = int8_bundle
    runtime = OnnxDeviceRuntime(out, threads=1, micro_batch=2)
    assert runtime.keeps_tape
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    rng = np.random.default_rng(4)
    image = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    h, tape = runtime.head_forward_taped(image, prompt)
    grad_h = rng.standard_normal(h.shape, dtype=np.float32)
    grad_prompt = runtime.head_vjp(tape, grad_h)

    p = torch.from_numpy(prompt).clone().requires_grad_(True)
    h32 = exported.split.head(torch.from_numpy(image), p)
    (g32,) = torch.autograd.grad(h32, p, torch.from_numpy(grad_h))
    h32, g32 = h32.detach().numpy(), g32.numpy()

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    assert 1e-5 < rel(h, h32) <= H_RTOL
    assert 1e-5 < rel(grad_prompt, g32) <= GRAD_RTOL
    cosine = (grad_prompt * g32).sum() / np.linalg.norm(grad_prompt) / np.linalg.norm(g32)
    assert cosine >= GRAD_COSINE
    local = runtime.tail_input_forward(image, prompt) if runtime.local_graphs else None
    assert local is None or np.isfinite(local).all()


def test_a_graph_without_weight_products_is_left_alone(tmp_path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "x"], ["y"], "m")], "g", [x], [y]
    )
    path = tmp_path / "g.onnx"
    onnx.save_model(onnx.helper.make_model(graph), str(path))
    before = path.read_bytes()
    assert quantize_weights(path) == 0
    assert path.read_bytes() == before


@pytest.mark.slow
def test_export_with_int8_head_weights_writes_a_bundle_the_runtime_opens(tmp_path) -> None:
    from tests.bundles import export_small_with_head_weights

    result = export_small_with_head_weights(tmp_path / "b", "int8")
    assert result.device.extra[HEAD_WEIGHTS_EXTRA] == "int8"
    load_manifest(result.device_dir, role="device")  # the checksums are those of the rewrite
    for name in HEAD_GRAPHS:
        model = onnx.load(str(result.device_dir / result.device.graphs[name].onnx))
        assert any(n.op_type == "MatMulInteger" for n in model.graph.node), name
    runtime = OnnxDeviceRuntime(result.device_dir, threads=1)
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    h, tape = runtime.head_forward_taped(np.zeros((2, 3, 32, 32), np.float32), prompt)
    assert np.isfinite(runtime.head_vjp(tape, np.ones_like(h))).all()
