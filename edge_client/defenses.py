"""What a device does to what it sends, so that a curious server learns less (issue 15).

Split training sends h, close to the image, and dL/dz, close to the label (docs/threat-model.md).
`Defense` perturbs both in numpy just before they leave; the exported graphs stay standard ONNX.

- h: each sample's h is scaled to L2 norm <= C (`clip_rows`) and N(0, (sigma C)^2) is added to
  every value (`add_gaussian`): a Gaussian mechanism on each release of each sample's activation,
  of L2 sensitivity 2C (`classic_epsilon`). It is not DP-SGD. dL/dh comes back through the clip's
  Jacobian (`ClipTape.vjp`); the noise, being added, passes it unchanged.
- dL/dz: Li et al.'s max-norm noise (`max_norm_noise`) hides each row's norm; isotropic noise
  sized to the batch's largest row norm (`relative_noise`) also turns its direction, which is what
  counts: the server knows z and the tail, so it can compute dL/dz for every candidate label.

The noise must be secret: the device draws it from OS entropy (`SplitLink`), never from its
`--seed`, which a server may know or guess. The TASK chooses the defense, so a malicious server
can ask for none: `DefenseFloor` (`sfprompt-edge start --require-noise` ...) is the least a
device accepts, and it sits out a round whose TASK asks for less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sfprompt.protocol.errors import BAD_FIELD, ProtocolError
from sfprompt.protocol.messages import PhaseSettings

DELTA = 1e-5
"""The delta at which `Defense.describe` states epsilon."""


def row_norms(x: np.ndarray) -> np.ndarray:
    """(B,) float64: the L2 norm of each sample, over every axis after the batch's."""
    flat = x.reshape(len(x), -1)
    return np.sqrt(np.einsum("bi,bi->b", flat, flat, dtype=np.float64))


def _per_row(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """(B,) values shaped to broadcast over `like`'s samples, in float32."""
    return values.astype(np.float32).reshape(-1, *[1] * (like.ndim - 1))


def _check_scale(value: float, name: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True, eq=False)
class ClipTape:
    """What the clip's vector-Jacobian product needs: the h it clipped (not a copy), its norms."""

    h: np.ndarray  # (B, ...) as the head gave it
    norms: np.ndarray  # (B,) float64
    scales: np.ndarray  # (B,) min(1, C / norm): 1 for a row left alone

    def vjp(self, grad: np.ndarray) -> np.ndarray:
        """dL/dh from dL/d clip(h): s (g - h (h . g) / |h|^2) on a clipped row, g elsewhere."""
        if grad.shape != self.h.shape:
            raise ValueError(f"dL/dh has shape {grad.shape}, the clipped h {self.h.shape}")
        clipped = self.scales < 1.0
        if not clipped.any():
            return grad
        flat_h, flat_g = self.h.reshape(len(grad), -1), grad.reshape(len(grad), -1)
        dots = np.einsum("bi,bi->b", flat_h, flat_g, dtype=np.float64)
        along = np.where(clipped, dots / np.maximum(self.norms, 1e-30) ** 2, 0.0)
        out = _per_row(self.scales, grad) * grad - _per_row(self.scales * along, grad) * self.h
        return out.astype(np.float32, copy=False)


def clip_rows(h: np.ndarray, bound: float) -> tuple[np.ndarray, ClipTape]:
    """Each sample of `h` scaled to L2 norm <= `bound`; rows within it are returned unchanged."""
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"the clip bound C must be a finite number > 0, got {bound!r}")
    norms = row_norms(h)
    scales = np.minimum(1.0, bound / np.maximum(norms, 1e-30))
    clipped = h if np.all(scales == 1.0) else h * _per_row(scales, h)
    return clipped, ClipTape(h, norms, scales)


def add_gaussian(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """`x` + N(0, std^2) on every value (float32); `x` itself for std 0."""
    _check_scale(std, "the noise std")
    if std == 0:
        return x
    return x + np.float32(std) * rng.standard_normal(x.shape, dtype=np.float32)


def max_norm_noise(grad: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Li et al. 2021 (arXiv 2102.08504), max_norm: row i gets N(0, (m^2 - |g_i|^2) / d) per
    value, m the batch's largest row norm, so every row's expected squared norm is m^2. The
    largest row gets no noise, and the noise is small beside the gaps between labels' gradients
    in d dimensions: it hides norms, barely directions."""
    norms = row_norms(grad)
    dims = grad[0].size if len(grad) else 1
    std = np.sqrt(np.maximum(norms.max(initial=0.0) ** 2 - norms**2, 0.0) / dims)
    noise = rng.standard_normal(grad.shape, dtype=np.float32)
    return grad + _per_row(std, grad) * noise


def relative_noise(grad: np.ndarray, multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """`grad` + isotropic Gaussian noise of expected norm `multiplier` x the batch's largest row
    norm, the same for every row (a scale the server cannot read a label from)."""
    _check_scale(multiplier, "the gradient noise multiplier")
    dims = grad[0].size if len(grad) else 1
    std = multiplier * float(row_norms(grad).max(initial=0.0)) / math.sqrt(dims)
    return add_gaussian(grad, std, rng)


def classic_epsilon(sigma: float, delta: float = DELTA) -> float | None:
    """Per-release epsilon of N(0, (sigma C)^2) on a value of L2 sensitivity 2C, by the classic
    bound (Dwork and Roth 2014, Theorem 3.22: std >= Delta sqrt(2 ln(1.25 / delta)) / epsilon
    gives (epsilon, delta)-DP for epsilon < 1): epsilon = 2 sqrt(2 ln(1.25 / delta)) / sigma.
    None where that is not below 1 (sigma <= 9.69 at delta 1e-5): the bound proves nothing there.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if sigma <= 0:
        return None
    epsilon = 2 * math.sqrt(2 * math.log(1.25 / delta)) / sigma
    return epsilon if epsilon < 1 else None


@dataclass(frozen=True)
class Defense:
    """What the round's TASK asks the device to do to what it sends; the default does nothing."""

    clip: float | None = None  # C: each sample's h scaled to L2 norm <= C
    noise: float = 0.0  # sigma: N(0, (sigma C)^2) on every value of the clipped h
    grad_noise: float = 0.0  # dL/dz noise of norm grad_noise x the batch's largest row norm
    grad_max_norm: bool = False  # Li et al.'s max-norm noise on dL/dz, before grad_noise

    @classmethod
    def from_settings(cls, settings: PhaseSettings) -> Defense:
        return cls(
            clip=settings.defense_clip,
            noise=settings.defense_noise,
            grad_noise=settings.defense_grad_noise,
            grad_max_norm=settings.defense_grad_max_norm,
        )

    @property
    def active(self) -> bool:
        return self.clip is not None or self.grad_noise > 0 or self.grad_max_norm

    def protect_h(
        self, h: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, ClipTape | None]:
        """h as it is to be sent, and the tape for dL/dh (None: h went unclipped)."""
        if self.clip is None:
            if self.noise:
                raise ValueError("noise needs a clip bound: its std is sigma * C")
            return h, None
        clipped, tape = clip_rows(h, self.clip)
        return add_gaussian(clipped, self.noise * self.clip, rng), tape

    def protect_grad(self, grad: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """dL/dz as it is to be sent; the device's own tail step keeps the exact one."""
        if self.grad_max_norm:
            grad = max_norm_noise(grad, rng)
        if self.grad_noise:
            grad = relative_noise(grad, self.grad_noise, rng)
        return grad

    def describe(self, delta: float = DELTA) -> str:
        """One line for logs and reports."""
        parts = []
        if self.clip is not None:
            text = f"h clipped to L2 norm {self.clip:g}"
            if self.noise:
                epsilon = classic_epsilon(self.noise, delta)
                bound = (
                    f"epsilon {epsilon:.3g} at delta {delta:g} per release (classic bound)"
                    if epsilon is not None
                    else "no epsilon from the classic bound at this sigma"
                )
                text += f", noise sigma {self.noise:g} ({bound})"
            parts.append(text)
        if self.grad_max_norm:
            parts.append("max-norm noise on dL/dz")
        if self.grad_noise:
            parts.append(f"dL/dz noise {self.grad_noise:g} x the batch's largest row norm")
        return "; ".join(parts) or "none"


NO_DEFENSE = Defense()


@dataclass(frozen=True)
class DefenseFloor:
    """The least defense this device accepts from a TASK; the default accepts any."""

    noise: float = 0.0  # sigma on h at least this (so a clip bound too)
    grad_noise: float = 0.0  # dL/dz noise at least this
    grad_max_norm: bool = False  # max-norm noise on dL/dz required

    def __post_init__(self) -> None:
        _check_scale(self.noise, "--require-noise")
        _check_scale(self.grad_noise, "--require-grad-noise")

    def shortfalls(self, defense: Defense) -> list[str]:
        """What `defense` lacks against this floor, one requirement each (empty: enough)."""
        missing = []
        if self.noise and (defense.clip is None or defense.noise < self.noise):
            missing.append(f"h clipped and noised at sigma >= {self.noise:g}")
        if defense.grad_noise < self.grad_noise:
            missing.append(f"dL/dz noise >= {self.grad_noise:g}")
        if self.grad_max_norm and not defense.grad_max_norm:
            missing.append("max-norm noise on dL/dz")
        return missing


def refuse_a_weaker_defense(defense: Defense, floor: DefenseFloor) -> None:
    """Raise ProtocolError naming what the TASK's `defense` lacks against this device's `floor`:
    the round fails on the device before anything is sent, and the server hears why."""
    missing = floor.shortfalls(defense)
    if missing:
        need = "at least this device's floor (--require-*): " + ", ".join(missing)
        raise ProtocolError(BAD_FIELD, "defense", need, defense.describe())
