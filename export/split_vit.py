"""Cut a timm VisionTransformer into a prompted head, a frozen body and a trainable tail.

Built from timm's own modules (`patch_embed`, `blocks`, `norm`, `fc_norm`, `head`) so that
weights keep timm's keys on both sides; every module is TorchScript-scriptable and has no
branches on data, so the same code serves eager PyTorch, ONNX export and TorchScript.

    image (B, 3, H, W) --head--> h (B, T, D) --body--> z (B, T, D) --select--> t --tail--> logits

T = R + P + N: R prefix tokens (class, distillation, register), P prompts, N patches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sfprompt.protocol.bundle import (
    ALL_PATCH_TOKENS,
    ALL_TOKENS,
    BATCH,
    MEAN_PATCH_TOKENS,
    PREFIX_TOKENS,
    PROMPT_KEY,
    TailInput,
)

__all__ = ["PROMPT_KEY", "TAIL_PREFIX", "Cut", "SplitViT"]
TAIL_PREFIX = "tail."


@dataclass(frozen=True)
class Cut:
    """Where to cut: `head_blocks` (k >= 1) stay on the device before the body,
    `tail_blocks` (m >= 0) after it; `prompts` is the number of learnable tokens."""

    head_blocks: int = 1
    tail_blocks: int = 0
    prompts: int = 10

    def check(self, depth: int) -> None:
        """Raise ValueError unless the cut leaves at least one block to the body."""
        if self.head_blocks < 1:
            raise ValueError("head_blocks must be >= 1 so the local loss depends on the prompts")
        if self.tail_blocks < 0 or self.prompts < 0:
            raise ValueError("tail_blocks and prompts must be >= 0")
        if self.head_blocks + self.tail_blocks >= depth:
            raise ValueError(
                f"head_blocks + tail_blocks = {self.head_blocks + self.tail_blocks} leaves no "
                f"block for the body of a {depth}-block model"
            )


def prefix_tokens(vit: VisionTransformer) -> torch.Tensor:
    """The learned tokens put before the patches, (1, R, D), in timm's order."""
    tokens = [getattr(vit, n, None) for n in ("cls_token", "dist_token", "reg_token")]
    present = [t.detach() for t in tokens if t is not None]
    if not present:
        return torch.zeros(1, 0, vit.embed_dim)
    return torch.cat(present, dim=1)


class PromptedHead(nn.Module):
    """Frozen patch embedding and first k blocks, with P prompt tokens after the prefix."""

    def __init__(self, vit: VisionTransformer, head_blocks: int) -> None:
        super().__init__()
        self.patch_embed = vit.patch_embed
        self.register_buffer("prefix_tokens", prefix_tokens(vit))
        pos = vit.pos_embed if vit.pos_embed is not None else torch.zeros(1, 1, vit.embed_dim)
        self.register_buffer("pos_embed", pos.detach())
        self.no_embed_class = bool(vit.no_embed_class)
        self.num_prefix = int(vit.num_prefix_tokens)
        self.norm_pre = vit.norm_pre
        self.blocks = nn.Sequential(*vit.blocks[:head_blocks])

    def forward(self, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image)  # (B, N, D)
        batch = x.shape[0]
        prefix = self.prefix_tokens.expand(batch, -1, -1)  # (B, R, D)
        if self.no_embed_class:
            x = torch.cat([prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([prefix, x], dim=1) + self.pos_embed  # (B, R + N, D)
        prompts = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, P, D)
        x = torch.cat([x[:, : self.num_prefix], prompts, x[:, self.num_prefix :]], dim=1)
        return self.blocks(self.norm_pre(x))  # (B, R + P + N, D)


class Body(nn.Module):
    """The frozen middle blocks the server runs: h (B, T, D) -> z (B, T, D)."""

    def __init__(self, vit: VisionTransformer, cut: Cut) -> None:
        super().__init__()
        end = len(vit.blocks) - cut.tail_blocks
        self.blocks = nn.Sequential(*vit.blocks[cut.head_blocks : end])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks(h)


class Tail(nn.Module):
    """The trainable end: last m blocks, final norm, pooling and classifier: t -> logits."""

    def __init__(self, vit: VisionTransformer, cut: Cut, tail_input: TailInput) -> None:
        super().__init__()
        depth = len(vit.blocks)
        self.blocks = nn.Sequential(*vit.blocks[depth - cut.tail_blocks :])
        self.norm = vit.norm
        self.fc_norm = vit.fc_norm
        self.head = vit.head
        self.distilled = hasattr(vit, "head_dist")
        self.head_dist = vit.head_dist if self.distilled else nn.Identity()
        # Mean-pool here only when the patch tokens themselves arrive; a pooled input (or the
        # class token) is read at position 0.
        self.pool_mean = vit.global_pool == "avg" and tail_input.kind in (
            ALL_TOKENS,
            ALL_PATCH_TOKENS,
        )
        self.pool_offset = (
            vit.num_prefix_tokens + cut.prompts if tail_input.kind == ALL_TOKENS else 0
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = self.norm(self.blocks(t))  # (B, T', D)
        if self.pool_mean:
            x = t[:, self.pool_offset :].mean(dim=1)  # (B, D)
        else:
            x = t[:, 0]  # (B, D)
        logits = self.head(self.fc_norm(x))  # (B, C)
        if self.distilled:
            logits = (logits + self.head_dist(t[:, 1])) / 2
        return logits


def tail_input_for(vit: VisionTransformer, cut: Cut) -> TailInput:
    """Decide what of z the tail reads: only that crosses the network downward."""
    dim = vit.embed_dim
    if cut.tail_blocks > 0:
        tokens = vit.num_prefix_tokens + cut.prompts + vit.patch_embed.num_patches
        return TailInput(ALL_TOKENS, tokens, (BATCH, tokens, dim))
    if vit.global_pool == "token":
        count = 2 if hasattr(vit, "head_dist") else 1
        return TailInput(PREFIX_TOKENS, count, (BATCH, count, dim))
    if isinstance(vit.norm, nn.Identity):
        return TailInput(MEAN_PATCH_TOKENS, 1, (BATCH, 1, dim))
    # A per-token norm before mean pooling: the mean cannot be taken before the tail.
    return TailInput(
        ALL_PATCH_TOKENS, vit.patch_embed.num_patches, (BATCH, vit.patch_embed.num_patches, dim)
    )


def select_tail_input(z: torch.Tensor, tail_input: TailInput, skip: int) -> torch.Tensor:
    """Cut z (B, T, D) down to what the tail reads; `skip` = prefix tokens + prompts."""
    if tail_input.kind == PREFIX_TOKENS:
        return z[:, : tail_input.count]
    if tail_input.kind == MEAN_PATCH_TOKENS:
        return z[:, skip:].mean(dim=1, keepdim=True)
    if tail_input.kind == ALL_PATCH_TOKENS:
        return z[:, skip:]
    return z


@dataclass
class SplitViT:
    """The three parts of one model, sharing its (frozen) modules."""

    vit: VisionTransformer
    cut: Cut
    tail_input: TailInput
    head: PromptedHead
    body: Body
    tail: Tail

    @classmethod
    def cut_model(cls, vit: VisionTransformer, cut: Cut) -> SplitViT:
        cut.check(len(vit.blocks))
        tail_input = tail_input_for(vit, cut)
        return cls(
            vit,
            cut,
            tail_input,
            PromptedHead(vit, cut.head_blocks),
            Body(vit, cut),
            Tail(vit, cut, tail_input),
        )

    @property
    def skip_tokens(self) -> int:
        return self.vit.num_prefix_tokens + self.cut.prompts

    def forward(self, image: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The whole model: what the server evaluates and what a split step must equal."""
        z = self.body(self.head(image, prompt))
        return self.tail(select_tail_input(z, self.tail_input, self.skip_tokens))

    def tail_keys(self) -> dict[str, str]:
        """Tail module parameter name -> bundle key (`tail.` + timm's own key)."""
        first = len(self.vit.blocks) - self.cut.tail_blocks
        keys = {}
        for name, _ in self.tail.named_parameters():
            timm_name = name
            if name.startswith("blocks."):
                index, rest = name[len("blocks.") :].split(".", 1)
                timm_name = f"blocks.{first + int(index)}.{rest}"
            if name.startswith("head_dist.") and not self.tail.distilled:
                continue
            keys[name] = TAIL_PREFIX + timm_name
        return keys

    def frozen_fingerprint(self) -> str:
        """sha256 of every frozen weight (head and body): device and server bundles of one
        export share it, so a device whose graphs hold other weights is refused at JOIN."""
        digest = hashlib.sha256()
        for prefix, state in (("head.", self.head.state_dict()), ("body.", self.body_state())):
            for key in sorted(state):
                tensor = state[key].detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{prefix}{key}{tuple(tensor.shape)}".encode())
                digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def body_state(self) -> dict[str, torch.Tensor]:
        """The body's weights under timm's keys (`blocks.{i}.…`)."""
        first = self.cut.head_blocks
        return {
            f"blocks.{first + int(name.split('.')[1])}.{name.split('.', 2)[2]}": t.detach()
            for name, t in self.body.state_dict().items()
        }


def init_prompt(cut: Cut, dim: int, seed: int = 0) -> torch.Tensor:
    """VPT-style uniform initialisation of the prompt tokens, (P, D), reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    bound = (6.0 / (cut.prompts + dim)) ** 0.5
    return (torch.rand(cut.prompts, dim, generator=gen) * 2 - 1) * bound
