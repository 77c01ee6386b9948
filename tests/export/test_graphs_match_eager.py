"""Every exported graph and TorchScript twin computes what eager PyTorch autograd computes.

The reference is plain autograd on the eager split model (`loss.backward()`), not the traced
functions, so a mistake in how the gradients were traced would show here.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from sfprompt.export.bundle_writer import example_inputs
from sfprompt.export.device_graphs import weighted_cross_entropy
from sfprompt.export.split_vit import PROMPT_KEY
from sfprompt.protocol.bundle import BATCH, LOCAL_GRAPHS, PREFIX_TOKENS
from tests.bundles import Exported

RTOL = 1e-4


def rel_err(got: np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def inputs(ex: Exported, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """The exporter's own example inputs, the bundle's weights, and uneven sample weights."""
    params = load_file(str(ex.result.device_dir / "prompt_tail.safetensors"))
    prompt = params.pop(PROMPT_KEY)
    x = example_inputs(ex.split, prompt, params, batch)
    gen = torch.Generator().manual_seed(seed)
    x["image"] = torch.randn(x["image"].shape, generator=gen)
    x["weight"] = torch.rand(batch, generator=gen) + 0.5
    return x


def eager_head_vjp(ex: Exported, x: dict[str, torch.Tensor]) -> torch.Tensor:
    prompt = x["prompt"].clone().requires_grad_(True)
    (ex.split.head(x["image"], prompt) * x["grad_h"]).sum().backward()
    return prompt.grad


def eager_tail_step(ex: Exported, x: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    keys = ex.split.tail_keys()
    tail = ex.split.tail
    with torch.no_grad():
        for name, p in tail.named_parameters():
            if name in keys:
                p.copy_(x[keys[name]])
    params = [p for n, p in tail.named_parameters() if n in keys]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    t = x["tail_input"].clone().requires_grad_(True)
    logits = tail(t)
    loss = weighted_cross_entropy(logits, x["labels"], x["weight"])
    loss.backward()
    out = [loss.detach(), logits.detach(), t.grad] + [p.grad for p in params]
    for p in params:
        p.requires_grad_(False)
    return out


def run_onnx(ex: Exported, name: str, x: dict[str, torch.Tensor]) -> list[np.ndarray]:
    spec = ex.result.device.graphs[name]
    sess = ort.InferenceSession(str(ex.result.device_dir / spec.onnx))
    return sess.run(None, {s.name: x[s.name].numpy() for s in spec.inputs})


def test_every_graph_passes_the_full_onnx_checker(exported: Exported) -> None:
    for spec in exported.result.device.graphs.values():
        model = onnx.load(str(exported.result.device_dir / spec.onnx))
        onnx.checker.check_model(model, full_check=True)
        domains = {node.domain for node in model.graph.node}
        assert domains <= {"", "ai.onnx"}, f"{spec.onnx} uses non-standard domains {domains}"


def test_manifest_batch_dimension_is_dynamic(exported: Exported) -> None:
    graphs = exported.result.device.graphs
    image = next(s for s in graphs["head_forward"].inputs if s.name == "image")
    assert image.shape[0] == BATCH
    assert graphs["tail_step"].outputs[0].name == "loss"


@pytest.mark.parametrize("batch_of", [lambda b: b, lambda b: 1, lambda b: b - 1])
def test_onnx_matches_eager_autograd(exported: Exported, batch_of) -> None:
    batch = batch_of(exported.batch)
    x = inputs(exported, batch)
    (h,) = run_onnx(exported, "head_forward", x)
    assert rel_err(h, exported.split.head(x["image"], x["prompt"])) <= RTOL
    (grad_prompt,) = run_onnx(exported, "head_vjp", x)
    assert rel_err(grad_prompt, eager_head_vjp(exported, x)) <= RTOL
    got = run_onnx(exported, "tail_step", x)
    want = eager_tail_step(exported, x)
    assert len(got) == len(want)
    for name, g, w in zip(exported.result.device.graphs["tail_step"].outputs, got, want):
        assert rel_err(g, w) <= RTOL, name.name
    (logits,) = run_onnx(exported, "tail_forward", x)
    assert rel_err(logits, want[1]) <= RTOL


@pytest.mark.parametrize("batch_of", [lambda b: b, lambda b: 1])
def test_tape_graphs_match_eager_autograd(exported: Exported, batch_of) -> None:
    """The head forward that keeps its tape, and the backward that reads it, give what the
    eager head and autograd give (no recomputation involved)."""
    x = inputs(exported, batch_of(exported.batch), seed=3)
    h, *tape = run_onnx(exported, "head_tape_forward", x)
    assert rel_err(h, exported.split.head(x["image"], x["prompt"])) <= RTOL
    assert tape, "a head with attention must keep something for its backward"
    backward = exported.result.device.graphs["head_tape_backward"]
    names = [s.name for s in backward.inputs]
    assert names == ["grad_h", *(f"tape.{i}" for i in range(len(tape)))]
    x.update({n: torch.from_numpy(t) for n, t in zip(names[1:], tape)})
    (grad_prompt,) = run_onnx(exported, "head_tape_backward", x)
    assert rel_err(grad_prompt, eager_head_vjp(exported, x)) <= RTOL


@pytest.mark.parametrize("batch_of", [lambda b: b, lambda b: 1])
def test_local_graphs_match_eager_autograd_on_the_rows_the_tail_reads(
    exported: Exported, batch_of
) -> None:
    """Where the tail reads h's first rows, the local phase's graphs give those rows and the
    prompt's gradient through them as the eager head and autograd do; elsewhere none exist."""
    graphs = exported.result.device.graphs
    tail_input = exported.result.device.tail_input
    assert tail_input is not None
    if tail_input.kind != PREFIX_TOKENS:
        assert not set(LOCAL_GRAPHS) & set(graphs)
        return
    rows = tail_input.count
    x = inputs(exported, batch_of(exported.batch), seed=5)
    t, *tape = run_onnx(exported, "head_local_forward", x)
    h = exported.split.head(x["image"], x["prompt"])
    assert t.shape == (len(x["image"]), rows, h.shape[-1])
    assert rel_err(t, h[:, :rows]) <= RTOL
    full_tape = sum(a.size for a in run_onnx(exported, "head_tape_forward", x)[1:])
    assert sum(a.size for a in tape) < full_tape / 2, "the local tape should be the small one"
    names = [s.name for s in graphs["head_local_backward"].inputs]
    assert names == ["grad_tail_input", *(f"tape.{i}" for i in range(len(tape)))]
    gen = torch.Generator().manual_seed(6)
    x["grad_tail_input"] = torch.randn(t.shape, generator=gen)
    x.update({n: torch.from_numpy(a) for n, a in zip(names[1:], tape)})
    (grad_prompt,) = run_onnx(exported, "head_local_backward", x)
    x["grad_h"] = torch.zeros(h.shape)
    x["grad_h"][:, :rows] = x["grad_tail_input"]
    assert rel_err(grad_prompt, eager_head_vjp(exported, x)) <= RTOL


def test_torchscript_twins_match_eager_autograd(exported: Exported) -> None:
    d = exported.result.device_dir
    for batch in (exported.batch, 1, exported.batch - 1):
        x = inputs(exported, batch, seed=2)
        keys = exported.result.device.parameters
        params = [x[k] for k in keys if k != PROMPT_KEY]
        head = torch.jit.load(str(d / "head_forward.pt"))
        assert (
            rel_err(
                head(x["image"], x["prompt"]).detach().numpy(),
                exported.split.head(x["image"], x["prompt"]),
            )
            <= RTOL
        )
        vjp = torch.jit.load(str(d / "head_vjp.pt"))
        got = vjp(x["image"], x["prompt"], x["grad_h"]).numpy()
        assert rel_err(got, eager_head_vjp(exported, x)) <= RTOL
        step = torch.jit.load(str(d / "tail_step.pt"))
        got_step = step(params, x["tail_input"], x["labels"], x["weight"])
        for g, w in zip(got_step, eager_tail_step(exported, x)):
            assert rel_err(g.detach().numpy(), w) <= RTOL
        fwd = torch.jit.load(str(d / "tail_forward.pt"))
        assert (
            rel_err(fwd(params, x["tail_input"]).numpy(), eager_tail_step(exported, x)[1]) <= RTOL
        )


def test_padding_with_zero_weight_trains_like_a_smaller_batch(exported: Exported) -> None:
    small = inputs(exported, 2, seed=5)
    padded = inputs(exported, exported.batch, seed=6)
    for key in ("tail_input", "labels", "weight"):
        padded[key][:2] = small[key]
    padded["weight"][2:] = 0.0
    got_small = run_onnx(exported, "tail_step", small)
    got_padded = run_onnx(exported, "tail_step", padded)
    outputs = exported.result.device.graphs["tail_step"].outputs
    for spec, a, b in zip(outputs, got_small, got_padded):
        if spec.name in ("logits", "grad_tail_input"):
            b = b[:2]
        assert rel_err(b, a) <= RTOL, spec.name
