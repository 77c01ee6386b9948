"""The device's self-update phase keeps exactly the highest-EL2N samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sfprompt.data.datasets import load_image_set
from sfprompt.data.transforms import EvalTransform
from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime
from sfprompt.edge_client.optimizer import Sgd
from sfprompt.edge_client.phases import LocalData, RoundAborted, self_update, split_gradients
from sfprompt.export.split_vit import select_tail_input
from sfprompt.protocol.bundle import PROMPT_KEY
from sfprompt.protocol.messages import PhaseSettings
from tests.bundles import eager_split
from tests.federation.harness import write_shards


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, small_export):
    root = tmp_path_factory.mktemp("phases")
    result = small_export
    (shard,) = write_shards(root / "data", devices=1, per_device=40)
    runtime = OnnxDeviceRuntime(result.device_dir)
    data = LocalData(load_image_set(shard), EvalTransform.from_config(result.device.preprocess))
    return result, runtime, data


def settings(**changes: float | str) -> PhaseSettings:
    base = dict(keep_ratio=0.3, local_epochs=1, local_lr=0.0, split_lr=0.0, deadline=1e11)
    base.update(split_epochs=1, encoding="fp32", prune="class")
    return PhaseSettings(**{**base, **changes}, batch_size=8)  # type: ignore[arg-type]


def torch_el2n(result, data: LocalData) -> np.ndarray:
    """EL2N of head -> tail (no body) in eager PyTorch, from the server bundle's weights."""
    split, params = eager_split(result)
    x, y = data.batch(np.arange(len(data)))
    with torch.no_grad():
        h = split.head(torch.from_numpy(x), params[PROMPT_KEY])
        logits = split.tail(select_tail_input(h, split.tail_input, split.skip_tokens))
        probs = torch.softmax(logits.double(), dim=1)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(y), probs.shape[1])
        return torch.linalg.vector_norm(probs - onehot, dim=1).numpy()


@pytest.mark.parametrize("local_epochs", [1, 0])
@pytest.mark.parametrize("prune", ["global", "class"])
def test_kept_samples_are_exactly_the_highest_el2n(setup, local_epochs: int, prune: str) -> None:
    """With lr 0 the training pass scores the data at fixed weights (and with no local epoch a
    forward-only pass does): the kept set must be the top 30% of an independent computation,
    of the whole set ("global", the paper's rule) or of each class ("class")."""
    result, runtime, data = setup
    params = runtime.initial_parameters()
    out = self_update(
        runtime,
        params,
        data,
        settings(local_epochs=local_epochs, prune=prune),
        Sgd(0.0),
        np.random.default_rng(0),
    )
    reference = torch_el2n(result, data)
    np.testing.assert_allclose(out.scores, reference, rtol=1e-4, atol=1e-5)
    labels = data.images.labels
    if prune == "global":
        expected = np.sort(np.argsort(-reference, kind="stable")[:12])  # ceil(0.3 * 40)
    else:
        expected = np.sort(np.concatenate([
            members[np.argsort(-reference[members], kind="stable")[: math.ceil(0.3 * len(members))]]
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
        ]))  # fmt: skip
        assert set(labels[out.kept]) == set(labels)  # every class keeps samples
    assert out.kept.tolist() == expected.tolist()
    assert len(set(out.kept)) == len(expected) >= 12


def test_self_update_trains_and_stops_when_asked(setup) -> None:
    _, runtime, data = setup
    params = runtime.initial_parameters()
    before = {k: v.copy() for k, v in params.items()}
    self_update(
        runtime,
        params,
        data,
        settings(local_lr=0.1, keep_ratio=1.0),
        Sgd(0.1),
        np.random.default_rng(0),
    )
    assert not np.array_equal(params[PROMPT_KEY], before[PROMPT_KEY])
    with pytest.raises(RoundAborted):
        self_update(
            runtime,
            params,
            data,
            settings(),
            Sgd(0.1),
            np.random.default_rng(0),
            should_stop=lambda: True,
        )


class EagerBody:
    """The server's part of a split step in eager PyTorch: z = body(h), dL/dh by autograd."""

    def __init__(self, split) -> None:
        self.split, self.calls = split, 0

    def forward(self, h: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.h = torch.from_numpy(h).requires_grad_(True)
        z = self.split.body(self.h)
        self.t = select_tail_input(z, self.split.tail_input, self.split.skip_tokens)
        return self.t.detach().numpy()

    def backward(self, grad_z: np.ndarray) -> np.ndarray:
        (grad,) = torch.autograd.grad(self.t, self.h, torch.from_numpy(grad_z))
        return grad.numpy()


@pytest.mark.parametrize(("micro_batch", "lean", "exchanges"), [(3, False, 3), (3, True, 1)])
def test_a_split_batch_sent_in_parts_gives_the_whole_batchs_gradient(
    setup, micro_batch: int, lean: bool, exchanges: int
) -> None:
    """Where the head keeps a tape the batch goes to the server one micro-batch at a time
    (8 = 3 + 3 + 2); the loss and gradients are the whole batch's, as eager autograd gives."""
    result, _, data = setup
    runtime = OnnxDeviceRuntime(result.device_dir, micro_batch=micro_batch, lean=lean)
    split, params = eager_split(result)
    x, y = data.batch(np.arange(8))
    numpy_params = {k: v.numpy() for k, v in params.items()}
    body = EagerBody(split)
    loss, grads = split_gradients(runtime, numpy_params, x, y, body)
    assert body.calls == exchanges
    prompt = params[PROMPT_KEY].clone().requires_grad_(True)
    tail = {n: p.requires_grad_(True) for n, p in split.tail.named_parameters()}
    h = split.head(torch.from_numpy(x), prompt)
    t = select_tail_input(split.body(h), split.tail_input, split.skip_tokens)
    expected = torch.nn.functional.cross_entropy(split.tail(t), torch.from_numpy(y))
    keys = [PROMPT_KEY, *split.tail_keys().values()]
    wrt = [prompt, *(tail[name] for name in split.tail_keys())]
    for key, grad in zip(keys, torch.autograd.grad(expected, wrt)):
        np.testing.assert_allclose(grads[key], grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=key)
    assert loss == pytest.approx(float(expected), rel=1e-5)
