"""The defense settings a leakage audit compares, written as short specs on the command line.

A spec joins parts with "+": `none`; `clip` (C = the audit's automatic bound) or `clip=C`;
`noise=SIGMA` (N(0, (SIGMA C)^2) on h, implies `clip`); `grad-noise=K`; `max-norm`. For example
`clip+noise=0.03+grad-noise=32`. Each becomes the devices' `Defense` (edge_client/defenses.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sfprompt.edge_client.defenses import Defense

# At the simulator's scale h has ~7,200 values of ~0.43 each (docs/threat-model.md), so noise
# of sigma C = 40 sigma per value is about the signal's size at sigma = 0.01; sigma = 1 (the
# scale of formal guarantees, still none below 9.7) buries it. K for dL/dz grows like sqrt(d).
DEFAULT_SETTINGS = (
    "none",
    "clip",
    "clip+noise=0.01",
    "clip+noise=0.03",
    "clip+noise=0.1",
    "clip+noise=0.3",
    "clip+noise=1",
    "max-norm",
    "grad-noise=8",
    "grad-noise=32",
    "clip+noise=0.1+grad-noise=64",
)
# The cheapest of the grid that halves the best SSIM and brings dL/dz to within 0.1 of chance on
# digits (docs/threat-model.md, "Measured: the leakage audit"); K = 32 left 0.34 of the labels.
DEFAULT_ACCURACY = ("none", "clip+noise=0.03", "clip+noise=0.1+grad-noise=64")
PARTS = "none, clip, clip=C, noise=SIGMA, grad-noise=K, max-norm"


@dataclass(frozen=True)
class AuditSetting:
    name: str  # the spec as given
    defense: Defense


def _number(part: str, value: str, positive: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"audit setting part {part!r}: needs a finite number {need}")
    return number


def parse_setting(spec: str, auto_clip: float) -> AuditSetting:
    """`spec` as a defense; a bare `clip` (or `noise` alone) takes `auto_clip` as C.

    Raises ValueError naming an unknown or malformed part.
    """
    name = spec.strip()
    clip: float | None = None
    noise = grad_noise = 0.0
    max_norm = False
    for part in filter(None, (p.strip() for p in name.split("+"))):
        key, has_value, value = part.partition("=")
        if key == "none" and not has_value:
            continue
        if key == "clip":
            clip = _number(part, value, positive=True) if has_value else auto_clip
        elif key == "noise" and has_value:
            noise = _number(part, value)
        elif key == "grad-noise" and has_value:
            grad_noise = _number(part, value)
        elif key == "max-norm" and not has_value:
            max_norm = True
        else:
            raise ValueError(f"unknown audit setting part {part!r} in {spec!r}: use {PARTS}")
    if noise and clip is None:
        clip = auto_clip
    return AuditSetting(name or "none", Defense(clip, noise, grad_noise, max_norm))


def check_specs(specs: tuple[str, ...], accuracy: tuple[str, ...]) -> None:
    """Raise ValueError for a malformed spec, or an accuracy run of a setting not audited."""
    for spec in specs + accuracy:
        parse_setting(spec, auto_clip=1.0)
    missing = [s for s in accuracy if s not in specs]
    if missing:
        raise ValueError(f"--audit-accuracy names settings not in --audit-settings: {missing}")
