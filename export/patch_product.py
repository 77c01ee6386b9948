"""The patch embedding as one matrix product, for the device's graphs.

timm embeds patches with a convolution whose kernel equals its stride: each patch is multiplied
by the same (D, C*p*p) matrix. Written as that product (cut the image into patches with a
reshape and a transpose, then `linear`), the device's graphs have one more weight product and
no convolution, so `--head-weights int8` quantizes it with the others: onnxruntime's int8
product takes ~1.2 ms where its float convolution takes ~8 (ViT-Base, 4 images, 2 threads).
The values are the convolution's up to float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .split_vit import PromptedHead


class PatchProduct(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D): timm's PatchEmbed with its convolution as a product."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module) -> None:
        super().__init__()
        self.patch = int(conv.kernel_size[0])
        self.weight = nn.Parameter(conv.weight.detach().flatten(1).clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.norm = norm

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = image.shape
        p = self.patch
        rows, cols = height // p, width // p
        patches = image.reshape(batch, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, channels * p * p)
        return self.norm(nn.functional.linear(patches, self.weight, self.bias))


def patches_as_product(head: PromptedHead) -> PromptedHead:
    """A copy of `head` whose patch embedding is a `PatchProduct`; `head` itself where its
    embedding is not timm's plain PatchEmbed (a convolution of kernel = stride, no padding,
    flattened to tokens)."""
    from timm.layers import PatchEmbed

    embed = head.patch_embed
    conv = getattr(embed, "proj", None)
    plain = (
        type(embed) is PatchEmbed
        and isinstance(conv, nn.Conv2d)
        and embed.flatten
        and not embed.dynamic_img_pad
        and conv.kernel_size == conv.stride
        and conv.kernel_size[0] == conv.kernel_size[1]
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )
    if not plain:
        return head
    product = copy.deepcopy(head)
    product.patch_embed = PatchProduct(conv, copy.deepcopy(embed.norm))
    return product
