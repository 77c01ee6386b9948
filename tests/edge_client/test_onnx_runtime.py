"""The device runtime (onnxruntime + numpy) reproduces PyTorch's local-loss gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime
from sfprompt.edge_client.tail_input import scatter_grad, select
from sfprompt.export.device_graphs import weighted_cross_entropy
from sfprompt.export.split_vit import PROMPT_KEY, select_tail_input
from sfprompt.protocol.bundle import LOCAL_GRAPHS, PREFIX_TOKENS
from tests.bundles import Exported, ExportedCases


# avg_m0 (the only mean-pooled tail input) only in the full run: one more export for the fast loop
@pytest.fixture(
    scope="module",
    params=["token_m0", pytest.param("avg_m0", marks=pytest.mark.slow), "avg_m1"],
)
def case(request: pytest.FixtureRequest, exported_cases: ExportedCases) -> Exported:
    return exported_cases[request.param]


@pytest.mark.parametrize("lean", [False, True], ids=["tape", "lean"])
def test_local_loss_prompt_gradient_matches_autograd(case, lean: bool) -> None:
    """head -> select -> tail on the device equals autograd through the eager model, whether
    the head's backward reads the forward's tape or recomputes the forward."""
    runtime = OnnxDeviceRuntime(case.result.device_dir, threads=1, micro_batch=2, lean=lean)
    assert runtime.keeps_tape is not lean
    params = runtime.initial_parameters()
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 3, 6], dtype=np.int64)
    weight = np.ones(3, dtype=np.float32)

    h, tape = runtime.head_forward_taped(image, params[PROMPT_KEY])
    assert (tape.nbytes > 0) is not lean
    np.testing.assert_array_equal(h, runtime.head_forward(image, params[PROMPT_KEY]))
    step = runtime.tail_step(params, select(h, runtime.manifest), labels, weight)
    grad_prompt = runtime.head_vjp(tape, scatter_grad(step.grad_input, runtime.manifest))

    split = case.split
    prompt = torch.from_numpy(params[PROMPT_KEY]).requires_grad_(True)
    with torch.no_grad():
        for name, key in split.tail_keys().items():
            split.tail.get_parameter(name).copy_(torch.from_numpy(params[key]))
    z = select_tail_input(
        split.head(torch.from_numpy(image), prompt), split.tail_input, split.skip_tokens
    )
    loss = weighted_cross_entropy(split.tail(z), torch.from_numpy(labels), torch.from_numpy(weight))
    loss.backward()
    assert abs(step.loss - loss.item()) <= 1e-4 * abs(loss.item())
    want = prompt.grad.numpy()
    assert np.abs(grad_prompt - want).max() <= 1e-4 * np.abs(want).max()
    assert set(step.grads) == set(runtime.tail_keys)


def test_wrong_shapes_are_refused_before_onnxruntime_sees_them(case) -> None:
    runtime = OnnxDeviceRuntime(case.result.device_dir, threads=1)
    params = runtime.initial_parameters()
    with pytest.raises(ValueError, match="image: expected shape"):
        runtime.head_forward(np.zeros((2, 3, 31, 32), np.float32), params[PROMPT_KEY])
    with pytest.raises(ValueError, match="prompt: expected dtype float32"):
        runtime.head_forward(
            np.zeros((2, 3, 32, 32), np.float32), params[PROMPT_KEY].astype(np.float64)
        )


def test_a_tape_serves_one_backward_and_is_freed_by_it(case) -> None:
    runtime = OnnxDeviceRuntime(case.result.device_dir, threads=1, micro_batch=2)
    params = runtime.initial_parameters()
    image = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    h, tape = runtime.head_forward_taped(image, params[PROMPT_KEY])
    assert len(tape.saved or []) == 2  # micro-batches of 2 and 1
    with pytest.raises(ValueError, match="3 images but 2 rows of grad_h"):
        runtime.head_vjp(tape, np.ones_like(h[:2]))
    runtime.head_vjp(tape, np.ones_like(h))
    assert tape.saved == [] and tape.nbytes == 0
    with pytest.raises(ValueError, match="already used"):
        runtime.head_vjp(tape, np.ones_like(h))


@pytest.mark.parametrize("lean", [False, True], ids=["tape", "lean"])
def test_the_local_phase_head_gives_what_the_full_head_gives_for_the_tail(case, lean) -> None:
    """t and the prompt's gradient from dL/dt: from the graphs that compute only the rows the
    tail reads (where the bundle has them) as from the full head, select and scatter."""
    runtime = OnnxDeviceRuntime(case.result.device_dir, threads=1, micro_batch=2, lean=lean)
    assert runtime.local_graphs is (case.result.device.tail_input.kind == PREFIX_TOKENS)
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    rng = np.random.default_rng(2)
    image = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    t, tape = runtime.tail_input_taped(image, prompt)
    grad_t = rng.standard_normal(t.shape).astype(np.float32)
    got = runtime.tail_input_vjp(tape, grad_t)
    assert (tape.backward == LOCAL_GRAPHS[1]) is runtime.local_graphs
    h, full_tape = runtime.head_forward_taped(image, prompt)
    want = runtime.head_vjp(full_tape, scatter_grad(grad_t, runtime.manifest))
    np.testing.assert_allclose(t, select(h, runtime.manifest), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runtime.tail_input_forward(image, prompt), t, rtol=1e-5, atol=1e-6)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_tape_is_taken_only_by_its_own_vjp_and_the_phases_never_share_memory(
    exported_cases: ExportedCases,
) -> None:
    runtime = OnnxDeviceRuntime(exported_cases["token_m0"].result.device_dir, threads=1)
    prompt = runtime.initial_parameters()[PROMPT_KEY]
    image = np.zeros((2, 3, 32, 32), np.float32)
    t, tape = runtime.tail_input_taped(image, prompt)
    h = runtime.head_forward(image, prompt)
    assert not set(LOCAL_GRAPHS) & set(runtime._sessions), "split-phase graphs beside local ones"
    with pytest.raises(ValueError, match="this tape is for head_local_backward"):
        runtime.head_vjp(tape, np.ones_like(h))
    runtime.tail_input_vjp(tape, np.ones_like(t))
    assert {n for n in runtime._sessions if n.startswith("head_")} == {LOCAL_GRAPHS[1]}


@pytest.mark.parametrize("lean", [False, True])
def test_sessions_stop_their_workers_spinning_after_each_call(lean: bool) -> None:
    """A device alternates sessions; an idle session's spinning workers took the cores from
    the running one (the split step ran 1.5-2x slower on 2 cores: docs/edge.md)."""
    from sfprompt.edge_client.onnx_runtime import session_options

    options = session_options(2, arena=not lean)
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_the_stand_in_grad_h_is_drawn_once_per_shape() -> None:
    """The benchmark's stand-in for the server's reply must not charge its drawing to the
    device, as eager's baseline draws it once."""
    from sfprompt.edge_client.memory_budget import dense_grad_h

    first, again = dense_grad_h((2, 5, 4)), dense_grad_h((2, 5, 4))
    assert first is again and not first.flags.writeable
    assert dense_grad_h((1, 5, 4)).shape == (1, 5, 4)
