"""The estimated time of one round for one device, and the FLOPs of an SFPrompt round.

The estimate is the paper's (appendix Table 1): compute at a nominal device and server speed plus
the transfers at a nominal uplink and downlink, so methods measured on one fast machine can be
compared as if they ran on a phone behind a mobile link. The formula is in docs/simulation.md.
FLOPs of the split methods are analytic, from export/plan.py's per-sample counts (a multiply-add
is 2 FLOPs, as torch's FlopCounterMode counts the in-process baselines).
"""

from __future__ import annotations

import math
from typing import Protocol

from timm.models.vision_transformer import VisionTransformer

from sfprompt.export.plan import block_flops, cut_cost
from sfprompt.export.split_vit import Cut

# The body's forward runs once for z, and again inside the VJP (the server keeps only h, see
# cloud_server/step_state.py), whose backward through frozen weights costs about one more.
BODY_PASSES_PER_SAMPLE = 3


class Links(Protocol):
    """Nominal speeds the estimate assumes (BaselineConfig has them, as may any config)."""

    device_gflops: float
    server_gflops: float
    uplink_mbps: float
    downlink_mbps: float


def round_minutes(
    device_flops: float, server_flops: float, bytes_up: float, bytes_down: float, cfg: Links
) -> float:
    """Minutes one device spends in one round: its compute, its share of the server's compute
    and its transfers each way, one after another (a split step waits for every part).

    Raises ValueError for a negative amount or a speed that is not finite and > 0.
    """
    amounts = {
        "device_flops": device_flops,
        "server_flops": server_flops,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
    }
    for name, value in amounts.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    for name in ("device_gflops", "server_gflops", "uplink_mbps", "downlink_mbps"):
        speed = getattr(cfg, name)
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"{name} must be finite and > 0, got {speed!r}")
    seconds = (
        device_flops / (cfg.device_gflops * 1e9)
        + bytes_up * 8 / (cfg.uplink_mbps * 1e6)
        + bytes_down * 8 / (cfg.downlink_mbps * 1e6)
        + server_flops / (cfg.server_gflops * 1e9)
    )
    return seconds / 60.0


def body_forward_flops(vit: VisionTransformer, cut: Cut) -> float:
    """FLOPs of the body's forward for one sample (its blocks see prefix, prompts and patches)."""
    mlp_dim = int(vit.blocks[0].mlp.fc1.out_features)  # type: ignore[union-attr, arg-type]
    tokens = vit.num_prefix_tokens + cut.prompts + vit.patch_embed.num_patches
    body_blocks = len(vit.blocks) - cut.head_blocks - cut.tail_blocks
    return body_blocks * block_flops(tokens, vit.embed_dim, mlp_dim)


def sfprompt_round_flops(
    vit: VisionTransformer,
    cut: Cut,
    local_samples: int,
    local_epochs: int,
    split_samples: int,
    split_epochs: int,
    scored_samples: int = 0,
) -> tuple[float, float]:
    """(device, server) FLOPs of one device's SFPrompt round.

    A local-loss step and a split step cost the device the same per sample (head forward, tail
    step, head VJP: export/plan.py's forward + backward); `scored_samples` are forward-only EL2N
    passes, which the device runs only when pruning without a local epoch. `local_samples` is
    the device's data set, `split_samples` what pruning kept. The server runs the body
    BODY_PASSES_PER_SAMPLE times per split sample. Raises ValueError for a negative count or a
    cut that does not fit the model.
    """
    counts = {
        "local_samples": local_samples,
        "local_epochs": local_epochs,
        "split_samples": split_samples,
        "split_epochs": split_epochs,
        "scored_samples": scored_samples,
    }
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    cut.check(len(vit.blocks))
    cost = cut_cost(vit, cut, batch=1)
    step = cost.forward_flops + cost.backward_flops
    trained = local_samples * local_epochs + split_samples * split_epochs
    device = trained * step + scored_samples * cost.forward_flops
    server = split_samples * split_epochs * BODY_PASSES_PER_SAMPLE * body_forward_flops(vit, cut)
    return float(device), float(server)
