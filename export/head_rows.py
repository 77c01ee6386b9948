"""The head as the local-loss phase needs it: only the rows the tail reads.

In the local phase the tail reads h directly, and at M=0 with timm's class-token pooling it
reads h's first R rows (the class token) and nothing else. The last head block then need not
produce the other T - R rows: their queries, attention outputs and MLPs are work whose result
nobody reads, and the backward through them multiplies zeros. `rows_read_by_tail` rewrites the
last block to compute the R rows from the keys and values of all rows, which gives the same t
and the same prompt gradient for about a fifth of a ViT-Base block's forward and a small part
of its backward. The split phase still needs every row of h (the body mixes them all) and keeps
the full head graphs.

At K=1 the block's input rows other than the prompts come from the image and frozen weights
alone, so, as in `head_tape.prompt_rows_only`, only the prompt rows' keys and values are
differentiated.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from sfprompt.protocol.bundle import LOCAL_GRAPHS

from .head_tape import RowGroups, export_tape_pair, partition_head, prompt_rows_only
from .split_vit import PromptedHead


def _plain_block(block: nn.Module) -> bool:
    """timm's `Block` with its `Attention`, ungated and unchanged: what the rewrite knows."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(block, "attn", None)
    return (
        type(block) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and type(attn.qkv) is nn.Linear
    )


def _linear_rows(linear: nn.Linear, start: int, stop: int) -> nn.Linear:
    """The output features start:stop of `linear`, as a linear of their own."""
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None)
    part.weight = nn.Parameter(linear.weight[start:stop].detach().clone(), requires_grad=False)
    if linear.bias is not None:
        part.bias = nn.Parameter(linear.bias[start:stop].detach().clone(), requires_grad=False)
    return part


class FirstRowsBlock(nn.Module):
    """A timm `Block` that outputs its first `rows` rows only: queries for those rows, keys and
    values for all. `prompt_bounds` (K=1): the rows whose keys and values are differentiated."""

    def __init__(self, block: nn.Module, rows: int, prompt_bounds: tuple[int, int] | None) -> None:
        super().__init__()
        attn = block.attn
        width = attn.num_heads * attn.head_dim  # attn_dim: q, k and v each have this many
        self.rows, self.heads, self.head_dim = rows, attn.num_heads, attn.head_dim
        self.scale = attn.scale
        self.query = nn.Sequential(block.norm1, _linear_rows(attn.qkv, 0, width))
        key_value: nn.Module = nn.Sequential(block.norm1, _linear_rows(attn.qkv, width, 3 * width))
        if prompt_bounds is not None:
            key_value = RowGroups(key_value, prompt_bounds, differentiated=1)
        self.key_value = key_value
        self.q_norm, self.k_norm, self.out_norm = attn.q_norm, attn.k_norm, attn.norm
        self.proj, self.ls1 = attn.proj, block.ls1
        self.norm2, self.mlp, self.ls2 = block.norm2, block.mlp, block.ls2
        self.detach_queries = prompt_bounds is not None  # the first rows precede the prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        first = x[:, : self.rows]
        q_in = first.detach() if self.detach_queries else first
        q = self.query(q_in).reshape(batch, self.rows, self.heads, self.head_dim).transpose(1, 2)
        kv = self.key_value(x).reshape(batch, tokens, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, self.rows, self.heads * self.head_dim)
        first = first + self.ls1(self.proj(self.out_norm(out)))
        return first + self.ls2(self.mlp(self.norm2(first)))


def rows_read_by_tail(head: PromptedHead, rows: int, prompts: int) -> PromptedHead | None:
    """A copy of `head` that outputs h's first `rows` rows only, or None where the last block
    is not one `FirstRowsBlock` knows (the local phase then uses the full head)."""
    if rows < 1 or prompts < 1 or not len(head.blocks) or not _plain_block(head.blocks[-1]):
        return None
    if rows > head.num_prefix:
        return None  # the first rows must precede the prompts (prefix tokens only)
    one_block = len(head.blocks) == 1
    local = copy.deepcopy(head) if one_block else prompt_rows_only(head, prompts)
    if local is head:
        local = copy.deepcopy(head)
    bounds = (head.num_prefix, head.num_prefix + prompts) if one_block else None
    local.blocks[-1] = FirstRowsBlock(local.blocks[-1], rows, bounds)
    return local


def export_local_tape(
    head: PromptedHead, rows: int, image: torch.Tensor, prompt: torch.Tensor, directory: Path
) -> dict[str, Path]:
    """Write `head_local_forward.onnx` (image, prompt -> tail_input, tape...) and
    `head_local_backward.onnx` (grad_tail_input, tape... -> grad_prompt) for a tail that reads
    h's first `rows` rows; nothing where `rows_read_by_tail` does not apply."""
    local = rows_read_by_tail(head, rows, prompt.shape[0])
    if local is None:
        return {}
    part = partition_head(local, image, prompt)
    return export_tape_pair(part, image, prompt, directory, LOCAL_GRAPHS, "tail_input")
