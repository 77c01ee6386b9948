"""The round-time estimate equals its formula worked by hand, and the analytic FLOPs of an SFPrompt
round add up the per-sample counts of export/plan.py as the phases use them."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfprompt.export.model_loading import create_vit
from sfprompt.export.plan import cut_cost
from sfprompt.export.split_vit import Cut, SplitViT
from sfprompt.sim.baselines import BaselineConfig
from sfprompt.sim.costs import body_forward_flops, round_minutes, sfprompt_round_flops

TINY = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 48, "num_heads": 3}


def test_round_minutes_by_hand() -> None:
    cfg = BaselineConfig()  # 10 GFLOPS device, 10 TFLOPS server, 12 Mbit/s up, 54 Mbit/s down
    # 2e10 FLOPs on the device: 2 s; 1.5e6 B up: 12e6 bit / 12e6 bit/s = 1 s;
    # 6.75e6 B down: 54e6 bit / 54e6 bit/s = 1 s; 3e13 server FLOPs: 3 s.  7 s in all.
    assert round_minutes(2e10, 3e13, 1.5e6, 6.75e6, cfg) == pytest.approx(7 / 60)
    assert round_minutes(0, 0, 0, 0, cfg) == 0.0
    faster = BaselineConfig(uplink_mbps=24.0)
    assert round_minutes(0, 0, 1.5e6, 0, faster) == pytest.approx(0.5 / 60)


@pytest.mark.parametrize(
    ("args", "cfg", "match"),
    [
        ((-1.0, 0.0, 0.0, 0.0), BaselineConfig(), "device_flops"),
        ((0.0, 0.0, math.nan, 0.0), BaselineConfig(), "bytes_up"),
        ((0.0, 0.0, 0.0, 0.0), BaselineConfig(downlink_mbps=0.0), "downlink_mbps"),
        ((0.0, 0.0, 0.0, 0.0), BaselineConfig(server_gflops=-1.0), "server_gflops"),
    ],
)
def test_round_minutes_refuses_impossible_numbers(args: tuple, cfg: BaselineConfig, match: str):
    with pytest.raises(ValueError, match=match):
        round_minutes(*args, cfg)


def test_sfprompt_round_flops_add_up_the_phases() -> None:
    vit = create_vit("vit_tiny_patch16_224", 10, model_args=dict(TINY))
    cut = Cut(1, 1, 5)
    per = cut_cost(vit, cut, batch=1)
    step = per.forward_flops + per.backward_flops
    # 100 samples x 2 local epochs, 30 kept x 3 split epochs, no scoring pass.
    device, server = sfprompt_round_flops(vit, cut, 100, 2, 30, 3)
    assert device == pytest.approx((200 + 90) * step)
    # Body: blocks 1 and 2 of 4, on 1 class + 5 prompts + 16 patches = 22 tokens, D 48, MLP 192.
    tokens, dim, mlp = 22, 48, 192
    block = 2 * tokens * dim * 4 * dim + 4 * tokens * tokens * dim + 4 * tokens * dim * mlp
    assert server == pytest.approx(90 * 3 * 2 * block)  # forward, and forward + VJP again
    # Pruning without a local epoch: one forward-only pass scores every sample.
    scored, _ = sfprompt_round_flops(vit, cut, 100, 0, 30, 1, scored_samples=100)
    assert scored == pytest.approx(30 * step + 100 * per.forward_flops)
    with pytest.raises(ValueError, match="split_samples"):
        sfprompt_round_flops(vit, cut, 100, 1, -1, 1)
    with pytest.raises(ValueError, match="no block for the body"):
        sfprompt_round_flops(vit, Cut(2, 2, 5), 100, 1, 30, 1)


def test_body_flops_match_torchs_count() -> None:
    """The analytic body forward counts exactly the matmuls FlopCounterMode counts."""
    vit = create_vit("vit_tiny_patch16_224", 10, model_args=dict(TINY))
    cut = Cut(1, 0, 3)
    split = SplitViT.cut_model(vit, cut)
    h = torch.zeros(2, 1 + 3 + 16, 48)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        split.body(h)
    assert counter.get_total_flops() == pytest.approx(2 * body_forward_flops(vit, cut))
