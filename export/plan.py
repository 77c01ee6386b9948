"""Cost of every cut (K head blocks, M tail blocks), so a user can choose where to split.

Analytic counts from the model's real dimensions: FLOPs count a multiply-add as 2; a backward
pass through frozen weights costs about one forward (activation gradients only), through
trained weights about two. Memory is the bundle's weights, the activations the head's VJP
keeps at batch B, and a measured runtime floor (Python, numpy, onnxruntime).
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models.vision_transformer import VisionTransformer

from .split_vit import Cut, tail_input_for

RUNTIME_FLOOR_MB = 75.0  # a fresh python + numpy + onnxruntime process, measured on x86-64


@dataclass(frozen=True)
class CutCost:
    head_blocks: int
    tail_blocks: int
    device_params: int
    trainable_params: int
    forward_flops: float  # per sample, on the device
    backward_flops: float  # per sample, on the device (split phase)
    up_bytes_fp32: int  # per sample: h up, dL/dz up
    down_bytes_fp32: int  # per sample: z (what the tail reads) down, dL/dh down
    peak_memory_mb: float  # estimated at the planned batch

    def round_seconds(
        self, device_gflops: float, uplink_mbps: float, downlink_mbps: float, fp16: bool = False
    ) -> float:
        """Seconds per sample of split training: device compute plus both transfers."""
        scale = 0.5 if fp16 else 1.0
        compute = (self.forward_flops + self.backward_flops) / (device_gflops * 1e9)
        up = self.up_bytes_fp32 * scale * 8 / (uplink_mbps * 1e6)
        down = self.down_bytes_fp32 * scale * 8 / (downlink_mbps * 1e6)
        return compute + up + down


def block_flops(tokens: int, dim: int, mlp_dim: int) -> float:
    """One transformer block's forward FLOPs per sample."""
    qkv_proj = 2 * tokens * dim * 4 * dim  # q, k, v and the output projection
    attention = 2 * 2 * tokens * tokens * dim  # scores and the weighted sum
    mlp = 2 * 2 * tokens * dim * mlp_dim
    return float(qkv_proj + attention + mlp)


def block_activation_floats(tokens: int, dim: int, mlp_dim: int, heads: int) -> int:
    """Floats one block keeps for its backward pass, per sample."""
    return tokens * (6 * dim + 2 * mlp_dim) + 2 * heads * tokens * tokens


def cut_cost(vit: VisionTransformer, cut: Cut, batch: int) -> CutCost:
    dim = vit.embed_dim
    block = vit.blocks[0]
    mlp_dim = block.mlp.fc1.out_features
    heads = block.attn.num_heads
    patches = vit.patch_embed.num_patches
    tokens = vit.num_prefix_tokens + cut.prompts + patches
    per_block = sum(p.numel() for p in block.parameters())
    embed = sum(p.numel() for p in vit.patch_embed.parameters()) + vit.pos_embed.numel()
    classifier = sum(p.numel() for p in vit.head.parameters()) + 2 * dim
    head_params = embed + cut.head_blocks * per_block
    tail_params = cut.tail_blocks * per_block + classifier
    trainable = cut.prompts * dim + tail_params

    in_ch = vit.patch_embed.proj.in_channels
    patch_area = vit.patch_embed.patch_size[0] * vit.patch_embed.patch_size[1]
    embed_flops = 2.0 * patches * in_ch * patch_area * dim
    blk = block_flops(tokens, dim, mlp_dim)
    head_fwd = embed_flops + cut.head_blocks * blk
    tail_fwd = cut.tail_blocks * blk + 2.0 * dim * vit.num_classes
    # The head's backward reads its forward's tape (frozen weights: one forward's worth, the
    # patch embedding needs none); the tail trains. --no-head-tape would add head_fwd.
    backward = cut.head_blocks * blk + 2 * tail_fwd

    # What the wire carries of z (and of dL/dz back) is the bundle's tail input, as exported.
    tail_tokens = tail_input_for(vit, cut).count
    up = 4 * (tokens * dim + tail_tokens * dim)
    down = 4 * (tail_tokens * dim + tokens * dim)

    acts = cut.head_blocks * block_activation_floats(tokens, dim, mlp_dim, heads)
    acts += cut.tail_blocks * block_activation_floats(tokens, dim, mlp_dim, heads)
    # The head weights live in two graphs (forward and VJP); activations for the VJP.
    memory = RUNTIME_FLOOR_MB + (2 * head_params + 3 * tail_params) * 4 / 2**20
    memory += batch * (acts + 4 * tokens * dim) * 4 / 2**20
    return CutCost(
        cut.head_blocks,
        cut.tail_blocks,
        head_params + tail_params + cut.prompts * dim,
        trainable,
        head_fwd + tail_fwd,
        backward,
        up,
        down,
        memory,
    )


def plan_cuts(
    vit: VisionTransformer, prompts: int, batch: int, max_head: int = 4, max_tail: int = 2
) -> list[CutCost]:
    """Costs of every cut with 1..max_head head blocks and 0..max_tail tail blocks."""
    depth = len(vit.blocks)
    return [
        cut_cost(vit, Cut(k, m, prompts), batch)
        for k in range(1, max_head + 1)
        for m in range(0, max_tail + 1)
        if k + m < depth
    ]


def recommend(
    costs: list[CutCost],
    memory_mb: float | None,
    device_gflops: float,
    uplink_mbps: float,
    downlink_mbps: float,
) -> CutCost | None:
    """The fastest cut per sample that fits the memory; None if none fits."""
    fitting = [c for c in costs if memory_mb is None or c.peak_memory_mb <= memory_mb]
    if not fitting:
        return None
    return min(fitting, key=lambda c: c.round_seconds(device_gflops, uplink_mbps, downlink_mbps))
