"""The device's numpy SGD matches torch.optim.SGD; EL2N and pruning pick the hardest samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sfprompt.edge_client.optimizer import Sgd
from sfprompt.edge_client.pruning import el2n_scores, keep_hardest


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)])
def test_sgd_matches_torch_over_several_steps(momentum: float, weight_decay: float) -> None:
    rng = np.random.default_rng(0)
    start = {
        "a": rng.standard_normal((3, 4), dtype=np.float32),
        "b": rng.standard_normal(5, dtype=np.float32),
    }
    grads = [
        {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in start.items()}
        for _ in range(4)
    ]
    ours = {k: v.copy() for k, v in start.items()}
    sgd = Sgd(0.1, momentum, weight_decay)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in start.items()}
    reference = torch.optim.SGD(
        tensors.values(), lr=0.1, momentum=momentum, weight_decay=weight_decay
    )
    for g in grads:
        sgd.step(ours, g)
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k])
        reference.step()
    for k, t in tensors.items():
        np.testing.assert_allclose(ours[k], t.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_el2n_is_the_distance_of_softmax_to_the_one_hot_label() -> None:
    logits = np.array([[0.0, 0.0], [10.0, -10.0], [10.0, -10.0]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    scores = el2n_scores(logits, labels)
    np.testing.assert_allclose(scores, [np.sqrt(0.5), 0.0, np.sqrt(2.0)], atol=1e-6)
    expected = torch.linalg.vector_norm(
        torch.softmax(torch.tensor(logits, dtype=torch.float64), 1)
        - torch.nn.functional.one_hot(torch.tensor(labels), 2),
        dim=1,
    )
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-12)


def test_keep_hardest_keeps_the_ceiling_of_the_ratio_of_highest_scores() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    assert keep_hardest(scores, 0.4).tolist() == [1, 3]
    assert keep_hardest(scores, 0.5).tolist() == [1, 2, 3]  # ceil(2.5) = 3
    assert keep_hardest(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert keep_hardest(scores, 0.01).tolist() == [1]  # never an empty round
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_hardest(scores, 0.0)


def test_keep_hardest_per_class_keeps_every_class() -> None:
    """A biased classifier scores one class low as a whole: a global cut drops that class,
    the per-class cut keeps the hardest ceil(ratio * n_c) of each."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    scores = np.array([0.9, 0.8, 0.95, 0.85, 0.1, 0.3, 0.2, 0.05, 0.7, 0.6])
    assert set(labels[keep_hardest(scores, 0.5)]) == {0, 2}  # class 1 gone
    kept = keep_hardest(scores, 0.5, labels)
    assert kept.tolist() == [0, 2, 5, 6, 8]  # 2 of class 0, 2 of class 1, 1 of class 2
    assert keep_hardest(scores, 1.0, labels).tolist() == list(range(10))
    with pytest.raises(ValueError, match="labels"):
        keep_hardest(scores, 0.5, labels[:3])
