"""The device's defenses on known arrays: clipping is exact, the noise has the stated size, a
seed reproduces it, sigma 0 is the clip alone, and dL/dh comes back through the clip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sfprompt.edge_client.defenses import (
    NO_DEFENSE,
    Defense,
    DefenseFloor,
    add_gaussian,
    classic_epsilon,
    clip_rows,
    max_norm_noise,
    refuse_a_weaker_defense,
    relative_noise,
    row_norms,
)
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import PhaseSettings


def _h(norms: list[float], shape: tuple[int, ...] = (5, 6), seed: int = 0) -> np.ndarray:
    """Samples of shape `shape` whose L2 norms are exactly `norms` (up to float32)."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((len(norms), *shape))
    h *= (np.array(norms) / row_norms(h)).reshape(-1, *[1] * len(shape))
    return h.astype(np.float32)


def test_clipping_scales_rows_above_c_to_c_and_leaves_the_rest_alone() -> None:
    h = _h([0.5, 3.0, 2.0, 40.0, 0.0])
    clipped, tape = clip_rows(h, 2.0)
    norms = row_norms(clipped)
    np.testing.assert_allclose(norms[[1, 3]], 2.0, rtol=1e-6)  # were above C
    np.testing.assert_array_equal(clipped[[0, 2, 4]], h[[0, 2, 4]])  # at or below C: unchanged
    np.testing.assert_allclose(tape.scales, [1.0, 2 / 3, 1.0, 0.05, 1.0], rtol=1e-6)
    for row in (1, 3):  # scaled, not turned
        cosine = np.dot(clipped[row].ravel(), h[row].ravel()) / (norms[row] * row_norms(h)[row])
        assert cosine == pytest.approx(1.0, abs=1e-6)
    within = h[[0, 2, 4]]
    assert clip_rows(within, 2.0)[0] is within  # nothing to clip: no copy


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_clip_bound_is_refused(bound: float) -> None:
    with pytest.raises(ValueError, match="clip bound"):
        clip_rows(_h([1.0]), bound)


def test_the_noise_has_the_stated_std_and_no_bias() -> None:
    """sigma C per value, measured on 2 million draws."""
    defense = Defense(clip=4.0, noise=0.3)
    h = np.zeros((100, 20_000), np.float32)
    sent, tape = defense.protect_h(h, np.random.default_rng(7))
    assert tape is not None and np.all(tape.scales == 1.0)
    assert sent.dtype == np.float32
    assert sent.std() == pytest.approx(0.3 * 4.0, rel=0.005)
    assert abs(float(sent.mean())) < 0.005
    per_row = sent.std(axis=1)  # every sample gets the same std
    assert per_row.min() > 1.2 * 0.97 and per_row.max() < 1.2 * 1.03


def test_a_seed_reproduces_the_noise_and_another_seed_does_not() -> None:
    defense = Defense(clip=1.0, noise=1.0, grad_noise=2.0, grad_max_norm=True)
    h, grad = _h([3.0, 0.5]), _h([1.0, 0.1], shape=(1, 8), seed=1)

    def run(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        return defense.protect_h(h, rng)[0], defense.protect_grad(grad, rng)

    first, again, other = run(3), run(3), run(4)
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)


def test_sigma_zero_is_the_clip_alone() -> None:
    h = _h([0.2, 5.0, 1.0])
    sent, tape = Defense(clip=1.0, noise=0.0).protect_h(h, np.random.default_rng(0))
    np.testing.assert_array_equal(sent, clip_rows(h, 1.0)[0])
    assert tape is not None
    assert add_gaussian(h, 0.0, np.random.default_rng(0)) is h


def test_no_defense_sends_the_arrays_themselves() -> None:
    h, grad = _h([3.0]), _h([1.0], shape=(1, 8))
    rng = np.random.default_rng(0)
    assert not NO_DEFENSE.active
    assert NO_DEFENSE.protect_h(h, rng) == (h, None)
    assert NO_DEFENSE.protect_grad(grad, rng) is grad
    assert NO_DEFENSE.describe() == "none"


def test_dl_dh_comes_back_through_the_clip() -> None:
    """The clip's VJP against a central finite difference of <w, clip(h)>, in float64."""
    h = _h([0.5, 3.0, 7.0], shape=(4, 3)).astype(np.float64)
    w = np.random.default_rng(5).standard_normal(h.shape)
    _, tape = clip_rows(h, 2.0)
    grad = tape.vjp(w)
    direction = np.random.default_rng(6).standard_normal(h.shape)
    eps = 1e-5

    def loss(x: np.ndarray) -> float:
        scales = np.minimum(1.0, 2.0 / row_norms(x)).reshape(-1, 1, 1)
        return float(np.sum(w * x * scales))

    numeric = (loss(h + eps * direction) - loss(h - eps * direction)) / (2 * eps)
    assert float(np.sum(grad * direction)) == pytest.approx(numeric, rel=1e-4)
    np.testing.assert_allclose(grad[0], w[0], rtol=1e-6)  # an unclipped row: unchanged
    with pytest.raises(ValueError, match="shape"):
        tape.vjp(w[:2])


def test_max_norm_noise_lifts_every_rows_expected_norm_to_the_largest() -> None:
    grad = _h([0.1, 0.5, 2.0], shape=(1, 64))
    draws = np.stack([max_norm_noise(grad, np.random.default_rng(s)) for s in range(2000)])
    mean_square = np.mean(row_norms(draws.reshape(-1, 64)).reshape(2000, 3) ** 2, axis=0)
    np.testing.assert_allclose(mean_square, 4.0, rtol=0.03)
    np.testing.assert_array_equal(draws[:, 2], np.broadcast_to(grad[2], draws[:, 2].shape))


def test_relative_noise_turns_directions_by_the_stated_amount() -> None:
    """Noise of norm k x the largest row: the largest row's cosine drops to ~1 / sqrt(1 + k^2)."""
    grad = _h([1.0, 0.25], shape=(1, 768))
    for multiplier in (0.5, 2.0):
        noisy = relative_noise(grad, multiplier, np.random.default_rng(1))
        noise_norms = row_norms(noisy - grad)
        np.testing.assert_allclose(noise_norms, multiplier * 1.0, rtol=0.08)
        cosine = np.sum(noisy[0] * grad[0]) / (row_norms(noisy)[0] * 1.0)
        assert cosine == pytest.approx(1 / math.sqrt(1 + multiplier**2), abs=0.06)
    with pytest.raises(ValueError, match="multiplier"):
        relative_noise(grad, -1.0, np.random.default_rng(0))


def test_classic_epsilon_is_the_textbook_value_or_none() -> None:
    expected = 2 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 20
    assert classic_epsilon(20.0, 1e-5) == pytest.approx(expected)
    assert expected == pytest.approx(0.4845, abs=1e-4)
    assert classic_epsilon(9.0, 1e-5) is None  # epsilon would be >= 1: the bound says nothing
    assert classic_epsilon(0.0) is None
    with pytest.raises(ValueError, match="delta"):
        classic_epsilon(20.0, 0.0)


def test_the_defense_comes_from_the_task_settings_and_describes_itself() -> None:
    settings = PhaseSettings(
        keep_ratio=0.5, local_epochs=1, local_lr=1e-3, split_lr=0.3, deadline=1.0,
        split_epochs=1, batch_size=8, encoding="fp16", prune="class",
        defense_clip=10.0, defense_noise=20.0, defense_grad_noise=3.0,
    )  # fmt: skip
    defense = Defense.from_settings(settings)
    assert defense == Defense(clip=10.0, noise=20.0, grad_noise=3.0, grad_max_norm=False)
    assert defense.active
    text = defense.describe()
    assert "L2 norm 10" in text and "sigma 20" in text and "epsilon 0.484" in text
    assert "3 x" in text
    assert "no epsilon" in Defense(clip=1.0, noise=1.0).describe()
    with pytest.raises(ValueError, match="clip bound"):
        Defense(noise=1.0).protect_h(_h([1.0]), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("defense", "missing"),
    [
        (Defense(), ["sigma >= 0.1", "dL/dz noise >= 16", "max-norm"]),
        (Defense(clip=1.0, noise=0.05, grad_noise=16, grad_max_norm=True), ["sigma >= 0.1"]),
        (Defense(clip=1.0, noise=0.1, grad_noise=8, grad_max_norm=True), ["dL/dz noise >= 16"]),
        (Defense(clip=2.0, noise=0.3, grad_noise=32, grad_max_norm=True), []),
    ],
)
def test_the_device_floor_names_what_a_tasks_defense_lacks(
    defense: Defense, missing: list[str]
) -> None:
    floor = DefenseFloor(noise=0.1, grad_noise=16, grad_max_norm=True)
    found = floor.shortfalls(defense)
    assert len(found) == len(missing)
    assert all(m in f for m, f in zip(missing, found))
    if missing:
        with pytest.raises(ProtocolError, match="--require-"):
            refuse_a_weaker_defense(defense, floor)
    else:
        refuse_a_weaker_defense(defense, floor)
    assert DefenseFloor().shortfalls(Defense()) == []


def test_a_bad_floor_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="--require-noise"):
        DefenseFloor(noise=-1.0)
    with pytest.raises(ValueError, match="--require-grad-noise"):
        DefenseFloor(grad_noise=float("nan"))
