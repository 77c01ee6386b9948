"""The patch embedding written as one product: the same h and prompt gradient as timm's
convolution, and left alone where the embedding is not the plain one."""

from __future__ import annotations

import torch

from sfprompt.export.patch_product import PatchProduct, patches_as_product
from tests.export.test_head_tape import assert_same_h_and_prompt_gradient, small_head


def test_the_product_gives_the_convolutions_values_and_prompt_gradient() -> None:
    head = small_head()
    product = patches_as_product(head)
    assert isinstance(product.patch_embed, PatchProduct)
    assert not isinstance(head.patch_embed, PatchProduct), "the original must stay as it was"
    assert_same_h_and_prompt_gradient(head, product)


def test_patches_are_cut_in_the_convolutions_order() -> None:
    """A weight that reads one pixel of each patch: the product must see that pixel, per patch,
    in row-major patch order (a wrong permute would still give the right shapes)."""
    head = small_head()
    conv = head.patch_embed.proj
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[0, 1, 2, 3] = 1.0  # output channel 0 = channel 1, row 2, column 3 of a patch
    image = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    got = PatchProduct(conv, torch.nn.Identity())(image)
    p = conv.kernel_size[0]
    want = image[:, 1, 2::p, 3::p].flatten(1)  # (B, rows * cols), row-major
    torch.testing.assert_close(got[..., 0], want)


def test_an_embedding_with_padding_is_left_alone() -> None:
    head = small_head()
    head.patch_embed.proj.padding = (1, 1)
    assert patches_as_product(head) is head
