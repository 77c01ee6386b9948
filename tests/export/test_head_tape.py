"""The head's training pass split in two, and the local phase's head: the pieces that make the
device cheaper than eager."""

from __future__ import annotations

import pytest
import sympy
import torch

from sfprompt.export.head_rows import FirstRowsBlock, rows_read_by_tail
from sfprompt.export.head_tape import RowGroups, evaluate_size, prompt_rows_only
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import Cut, SplitViT
from tests.bundles import SMALL_VIT


def small_head(head_blocks: int = 1):
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", 5, model_args=dict(SMALL_VIT))
    return SplitViT.cut_model(vit, Cut(head_blocks, 0, 3)).head.eval()


def assert_same_h_and_prompt_gradient(head, rewritten) -> None:  # noqa: ANN001
    """`rewritten` gives `head`'s h and prompt gradient (within 1e-5) on a random batch."""
    image = torch.randn(2, 3, 32, 32)
    prompt = torch.randn(3, 192, requires_grad=True)
    want, got = head(image, prompt), rewritten(image, prompt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad_h = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, prompt, grad_h)
    (g_got,) = torch.autograd.grad(got, prompt, grad_h)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def test_prompt_rows_only_keeps_the_values_and_the_prompt_gradient() -> None:
    head = small_head()
    rows = prompt_rows_only(head, prompts=3)
    assert isinstance(rows.blocks[0].attn.qkv, RowGroups)
    assert not isinstance(head.blocks[0].attn.qkv, RowGroups), "the original must stay as it was"
    assert_same_h_and_prompt_gradient(head, rows)


def test_row_groups_differentiate_one_group_only() -> None:
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 6, 4, requires_grad=True)
    out = RowGroups(linear, (1, 3), differentiated=1)(x)
    torch.testing.assert_close(out, linear(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad[:, 1:3].abs().sum() > 0
    assert grad[:, :1].abs().sum() == 0 and grad[:, 3:].abs().sum() == 0


def test_without_prompts_the_head_is_left_alone() -> None:
    head = small_head()
    assert prompt_rows_only(head, prompts=0) is head


def test_sizes_are_integer_polynomials_of_the_batch() -> None:
    s = sympy.Symbol("s")
    assert evaluate_size(12 * s, s, 5) == 60
    assert evaluate_size(3 * s**2 + 1, s, 2) == 13


@pytest.mark.parametrize("head_blocks", [1, 2])
def test_the_local_head_gives_the_first_rows_and_their_prompt_gradient(head_blocks) -> None:
    head = small_head(head_blocks)
    local = rows_read_by_tail(head, rows=1, prompts=3)
    assert isinstance(local.blocks[-1], FirstRowsBlock)
    assert not isinstance(head.blocks[-1], FirstRowsBlock), "the original must stay as it was"
    image = torch.randn(2, 3, 32, 32)
    prompt = torch.randn(3, 192, requires_grad=True)
    want, got = head(image, prompt)[:, :1], local(image, prompt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad_t = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, prompt, grad_t)
    (g_got,) = torch.autograd.grad(got, prompt, grad_t)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert g_got.abs().max() > 0


def test_the_local_head_applies_only_to_rows_before_the_prompts() -> None:
    head = small_head()
    assert rows_read_by_tail(head, rows=head.num_prefix + 1, prompts=3) is None
    assert rows_read_by_tail(head, rows=1, prompts=0) is None
