"""What a curious server can make of what a device sends (issue 15; docs/threat-model.md).

Three attacks, each with the server's full knowledge: the public frozen head, the prompt and tail
it sent in the TASK, the defense settings it chose, and z = body(h), which it computed itself.

- `invert_h`: white-box inversion of h (UnSplit-style): Adam on an image from noise until the
  head reproduces the h that was sent, with a small total-variation prior.
- `PatchDecoder` / `train_decoder`: a learned inverse (FSHA's inverse network, trained openly):
  a small network mapping h back to the image, trained on public images the devices do not hold,
  through the same defense the devices apply (the server knows it and draws its own noise).
- `infer_labels`: for each candidate label, the dL/dz the device would send for it (the server
  knows z and the tail); the nearest to what came is the guess.

Reconstructions are scored by `ssim` (Wang et al. 2004) and `psnr` against the real images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# SSIM as Wang et al. 2004 (and skimage's gaussian_weights=True): an 11-tap Gaussian window of
# sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample) statistics.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03

HeadFn = Callable[[torch.Tensor], torch.Tensor]  # pixels (B, 3, H, W) in [0, 1] -> h
TailFn = Callable[[torch.Tensor], torch.Tensor]  # what the tail reads -> logits


# ------------------------------------------------------------------------------- the scores


def _gaussian_window() -> np.ndarray:
    taps = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    window = np.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _local_mean(x: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local means of (B, H, W), edges mirrored, then the border that saw the
    mirror cut off (as skimage does): (B, H - 10, W - 10)."""
    window = _gaussian_window()
    r = SSIM_RADIUS
    padded = np.pad(x, ((0, 0), (r, r), (r, r)), mode="symmetric")
    rows = sum(w * padded[:, i : i + padded.shape[1] - 2 * r, :] for i, w in enumerate(window))
    both = sum(w * rows[:, :, i : i + rows.shape[2] - 2 * r] for i, w in enumerate(window))
    return both[:, r:-r, r:-r]


def _grey_batch(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{name}: expected (H, W) or (B, H, W) images, got shape {x.shape}")
    if min(x.shape[1:]) <= 2 * SSIM_RADIUS:
        raise ValueError(f"{name}: SSIM needs images larger than 11 x 11, got {x.shape[1:]}")
    return x


def ssim(real: np.ndarray, other: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Mean SSIM of each image pair, (B,) in [-1, 1]; 1 only for identical images.

    `real`, `other`: (H, W) or (B, H, W) grey images on a scale of `data_range`.
    """
    x, y = _grey_batch(real, "real"), _grey_batch(other, "other")
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {x.shape} and {y.shape}")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _local_mean(x), _local_mean(y)
    vx = _local_mean(x * x) - mx * mx
    vy = _local_mean(y * y) - my * my
    cov = _local_mean(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * cov + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return (num / den).mean(axis=(1, 2))


def psnr(real: np.ndarray, other: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """PSNR of each image pair in dB, (B,); inf for identical images."""
    x, y = np.asarray(real, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {x.shape} and {y.shape}")
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    mse = ((x - y) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) pixels -> (B, H, W): the channels' mean (the digits are grey in 3 copies)."""
    if pixels.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) pixels, got shape {pixels.shape}")
    return pixels.mean(axis=1)


# ------------------------------------------------------------------- inversion by optimisation


@dataclass(frozen=True)
class InversionConfig:
    """Adam on the image's logits (pixels = sigmoid), from uniform noise."""

    steps: int = 150
    lr: float = 0.1
    tv_weight: float = 0.1  # the total-variation prior, against the normalised feature loss
    grey: bool = False  # optimise one channel, copied to three (the public data is grey)
    seed: int = 0


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: small for smooth images."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def invert_h(
    head: HeadFn, h_sent: torch.Tensor, shape: tuple[int, int, int], cfg: InversionConfig
) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] whose h (by `head`) comes closest to `h_sent`.

    The feature loss is normalised by |h_sent|^2, so one `tv_weight` fits any scale of h.
    """
    if cfg.steps < 1:
        raise ValueError(f"inversion steps must be >= 1, got {cfg.steps}")
    channels, height, width = shape
    generator = torch.Generator().manual_seed(cfg.seed)
    start = torch.rand(len(h_sent), 1 if cfg.grey else channels, height, width, generator=generator)
    logits = torch.logit(start.clamp(0.02, 0.98)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=cfg.lr)
    scale = h_sent.pow(2).mean().clamp_min(1e-12)
    for _ in range(cfg.steps):
        optimiser.zero_grad()
        pixels = torch.sigmoid(logits).expand(-1, channels, -1, -1)
        loss = (head(pixels) - h_sent).pow(2).mean() / scale
        (loss + cfg.tv_weight * total_variation(pixels)).backward()
        optimiser.step()
    with torch.no_grad():
        return torch.sigmoid(logits).expand(-1, channels, -1, -1).numpy().copy()


# ------------------------------------------------------------------------ a learned decoder


class PatchDecoder(nn.Module):
    """h's patch tokens (B, N, D) on their grid -> pixels (B, C, H, W) in [0, 1]: a per-token
    map, a transposed convolution back to each patch's pixels, and a 3 x 3 refinement."""

    def __init__(self, dim: int, grid: tuple[int, int], patch: int, channels: int = 3) -> None:
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(
            nn.Conv2d(dim, 128, 1),
            nn.GELU(),
            nn.ConvTranspose2d(128, 16, patch, stride=patch),
            nn.GELU(),
            nn.Conv2d(16, channels, 3, padding=1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, dim = tokens.shape
        if count != self.grid[0] * self.grid[1]:
            raise ValueError(f"decoder: {count} patch tokens, the grid has {self.grid}")
        grid = tokens.transpose(1, 2).reshape(batch, dim, *self.grid)
        return torch.sigmoid(self.net(grid))


@dataclass(frozen=True)
class DecoderConfig:
    epochs: int = 15
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0


def train_decoder(
    decoder: PatchDecoder,
    pixels: np.ndarray,
    tokens_of: Callable[[np.ndarray, np.random.Generator], np.ndarray],
    cfg: DecoderConfig,
) -> PatchDecoder:
    """Fit `decoder` on public `pixels` (B, C, H, W) in [0, 1]; `tokens_of(rows, rng)` gives the
    patch tokens the server would receive for those rows (with fresh defense noise each call)."""
    if cfg.epochs < 0:
        raise ValueError(f"decoder epochs must be >= 0, got {cfg.epochs}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    target = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
    decoder.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(len(pixels))
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            tokens = torch.from_numpy(tokens_of(rows, rng))
            optimiser.zero_grad()
            F.mse_loss(decoder(tokens), target[rows]).backward()
            optimiser.step()
    decoder.eval()
    return decoder


def decode(decoder: PatchDecoder, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return decoder(torch.from_numpy(np.ascontiguousarray(tokens))).numpy()


# ------------------------------------------------------------------- labels from dL/dz


def label_gradients(tail: TailFn, t: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, B, ...): the dL/dt a device sends for its batch t if every row had label c,
    under the batch-mean cross-entropy the device trains with (export/device_graphs.py)."""
    out = []
    for label in range(classes):
        leaf = t.detach().requires_grad_(True)
        logits = tail(leaf)
        target = torch.full((len(t),), label, dtype=torch.long)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, target), leaf)
        out.append(grad)
    return torch.stack(out)


def infer_labels(grad_sent: np.ndarray, candidates: torch.Tensor) -> np.ndarray:
    """(B,) the label whose dL/dt is nearest (L2) to each row that was sent: the maximum
    likelihood guess under isotropic Gaussian noise. Each row's gradient depends only on its
    own sample, so a batch's rows are guessed one by one."""
    sent = torch.from_numpy(np.ascontiguousarray(grad_sent)).reshape(1, len(grad_sent), -1)
    distances = (candidates.reshape(len(candidates), len(grad_sent), -1) - sent).pow(2).sum(-1)
    return distances.argmin(dim=0).numpy()
