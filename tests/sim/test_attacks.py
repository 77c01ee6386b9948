"""The leakage audit's attacks and scores (sim/attacks.py): each must succeed where success is
certain and fail where nothing can be recovered, so that a broken attack cannot pass for a strong
defense."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sfprompt.edge_client.defenses import Defense, clip_rows
from sfprompt.sim import attacks
from sfprompt.sim.audit import clip_torch

SIZE, PATCH = 16, 4


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """(count, 3, 16, 16) grey images in [0, 1]: random blobs, in the three channels alike."""
    rng = np.random.default_rng(seed)
    i, j = np.mgrid[0:SIZE, 0:SIZE]
    out = np.zeros((count, SIZE, SIZE))
    for n in range(count):
        for _ in range(3):
            ci, cj, width = rng.uniform(2, 14), rng.uniform(2, 14), rng.uniform(2, 4)
            out[n] += np.exp(-((i - ci) ** 2 + (j - cj) ** 2) / (2 * width**2))
    out = np.clip(out, 0, 1)
    return np.repeat(out[:, None], 3, axis=1).astype(np.float32)


def toy_head(seed: int = 0) -> nn.Conv2d:
    """A linear patch embedding, 48 pixels of a 4 x 4 RGB patch to 32 numbers: like the
    first step of a ViT's head, and certainly invertible on grey images (16 unknowns a patch)."""
    torch.manual_seed(seed)
    embed = nn.Conv2d(3, 32, PATCH, stride=PATCH)
    embed.requires_grad_(False)
    return embed


def tokens(embed: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    return embed(pixels).flatten(2).transpose(1, 2)  # (B, N, D)


# ---------------------------------------------------------------------------------- scores


def test_ssim_and_psnr_match_scikit_image_on_a_known_pair() -> None:
    # Reference values from skimage 0.26: structural_similarity(a, b, data_range=1.0,
    # gaussian_weights=True, sigma=1.5, use_sample_covariance=False), peak_signal_noise_ratio.
    i, j = np.mgrid[0:20, 0:24].astype(np.float64)
    a = (np.sin(0.7 * i) + np.cos(0.5 * j) + 2) / 4
    b = 0.8 * a**2 + 0.1 * ((i + j) % 2)
    assert attacks.ssim(a, b)[0] == pytest.approx(0.7458109196361956, abs=1e-9)
    assert attacks.psnr(a[None], b[None])[0] == pytest.approx(13.130111502597659, abs=1e-9)


def test_ssim_is_one_for_identical_images_and_low_for_noise() -> None:
    images = smooth_images(4)[:, 0]
    noise = np.random.default_rng(1).random(images.shape)
    assert np.allclose(attacks.ssim(images, images), 1.0)
    assert np.all(np.isinf(attacks.psnr(images, images)))
    assert attacks.ssim(images, noise).max() < 0.2
    assert attacks.ssim(images, 1 - images).max() < 0  # an inverted image is anti-correlated


def test_scores_refuse_mismatched_or_tiny_images() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        attacks.ssim(np.zeros((2, 16, 16)), np.zeros((2, 16, 17)))
    with pytest.raises(ValueError, match="larger than 11 x 11"):
        attacks.ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shapes differ"):
        attacks.psnr(np.zeros((2, 4)), np.zeros((3, 4)))


# ---------------------------------------------------------------------------- inversion


def test_inversion_recovers_images_through_a_linear_patch_embedding() -> None:
    embed = toy_head()
    real = smooth_images(4)
    h = tokens(embed, torch.from_numpy(real))
    cfg = attacks.InversionConfig(steps=200, grey=True)
    found = attacks.invert_h(lambda px: tokens(embed, px), h, real.shape[1:], cfg)
    score = attacks.ssim(attacks.to_grey(real), attacks.to_grey(found))
    assert score.min() > 0.9, score


def test_inversion_of_pure_noise_recovers_nothing() -> None:
    embed = toy_head()
    real = smooth_images(4)
    h = tokens(embed, torch.from_numpy(real))
    noise = torch.randn_like(h, generator=torch.Generator().manual_seed(0)) * h.std()
    cfg = attacks.InversionConfig(steps=200, grey=True)
    found = attacks.invert_h(lambda px: tokens(embed, px), noise, real.shape[1:], cfg)
    assert attacks.ssim(attacks.to_grey(real), attacks.to_grey(found)).mean() < 0.3


def test_the_servers_clip_is_the_devices_clip() -> None:
    h = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    h[0] *= 10  # one row far above the bound, others around it
    bound = float(np.median(np.linalg.norm(h.reshape(5, -1), axis=1)))
    device, _ = clip_rows(h, bound)
    server = clip_torch(torch.from_numpy(h), bound).numpy()
    assert np.allclose(device, server, rtol=1e-6, atol=1e-6)
    assert clip_torch(torch.from_numpy(h), None) is not None


# ------------------------------------------------------------------------------ decoder


def test_decoder_learns_to_invert_the_head_from_public_images() -> None:
    embed = toy_head()
    public = smooth_images(128, seed=1)
    public_h = tokens(embed, torch.from_numpy(public)).numpy()
    decoder = attacks.PatchDecoder(32, (SIZE // PATCH, SIZE // PATCH), PATCH)
    attacks.train_decoder(
        decoder, public, lambda rows, rng: public_h[rows], attacks.DecoderConfig(epochs=30)
    )
    real = smooth_images(8, seed=2)  # images the decoder never saw
    decoded = attacks.decode(decoder, tokens(embed, torch.from_numpy(real)).numpy())
    assert attacks.ssim(attacks.to_grey(real), attacks.to_grey(decoded)).mean() > 0.7


def test_decoder_refuses_tokens_off_its_grid() -> None:
    decoder = attacks.PatchDecoder(32, (4, 4), PATCH)
    with pytest.raises(ValueError, match="patch tokens"):
        decoder(torch.zeros(1, 15, 32))


# ------------------------------------------------------------------------------- labels


def toy_tail(dim: int, classes: int) -> nn.Module:
    """Final norm and a linear classifier on the class token, as the tail at M = 0."""
    torch.manual_seed(0)
    return nn.Sequential(nn.LayerNorm(dim), nn.Flatten(), nn.Linear(dim, classes))


def sent_gradients(tail: nn.Module, t: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """dL/dt of a batch-mean cross-entropy, as the device computes it."""
    leaf = t.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(tail(leaf), torch.from_numpy(labels))
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad.numpy()


LABEL_CASES = [
    (Defense(), 1.0, 1.0),
    (Defense(grad_max_norm=True), 0.8, 1.0),
    (Defense(grad_noise=64.0), 0.0, 0.45),
]


@pytest.mark.parametrize(("defense", "low", "high"), LABEL_CASES)
def test_labels_from_gradients(defense: Defense, low: float, high: float) -> None:
    """Exact without noise; mostly right with max-norm (it hides norms, barely directions);
    near chance (0.25) under noise 64 x the largest row norm in 16 dimensions."""
    dim, classes, batch = 16, 4, 32
    tail = toy_tail(dim, classes)
    rng = np.random.default_rng(0)
    right = total = 0
    for _ in range(16):
        t = torch.from_numpy(rng.normal(size=(batch, 1, dim)).astype(np.float32))
        labels = rng.integers(0, classes, batch)
        sent = defense.protect_grad(sent_gradients(tail, t, labels), rng)
        guessed = attacks.infer_labels(sent, attacks.label_gradients(tail, t, classes))
        right += int((guessed == labels).sum())
        total += batch
    assert low <= right / total <= high


def test_label_gradients_are_what_a_device_would_send() -> None:
    tail = toy_tail(8, 3)
    t = torch.randn(5, 1, 8, generator=torch.Generator().manual_seed(1))
    candidates = attacks.label_gradients(tail, t, 3)
    labels = np.array([2, 2, 2, 2, 2])
    assert torch.allclose(candidates[2], torch.from_numpy(sent_gradients(tail, t, labels)))
    assert candidates.shape == (3, 5, 1, 8)


def test_inversion_refuses_no_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        attacks.invert_h(
            lambda x: x, torch.zeros(1, 3, 16, 16), (3, 16, 16), attacks.InversionConfig(steps=0)
        )
    assert math.isfinite(attacks.total_variation(torch.zeros(1, 3, 4, 4)).item())
