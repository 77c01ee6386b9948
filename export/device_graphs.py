"""The four computations a device runs, as plain functions of tensors.

    head_forward (image, prompt)                  -> h
    head_vjp     (image, prompt, grad_h)          -> grad_prompt
    tail_step    (tail params, t, labels, weight) -> loss, logits, grad_t, grad of each param
    tail_forward (tail params, t)                 -> logits

Frozen weights come first as a dict (they become ONNX initializers); trainable tail parameters
are inputs, so one graph serves every round. Gradients use `torch.autograd.grad`, which
`make_fx` can trace with a symbolic batch dimension (`torch.func.vjp` specialises it).
The same computations as scriptable modules make the TorchScript twins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import List  # TorchScript reads these annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .split_vit import PromptedHead, Tail


def weighted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy weighted per sample; a zero weight makes a padded row inert."""
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    return (ce * weight).sum() / weight.sum().clamp_min(1e-12)


@dataclass(frozen=True)
class DeviceFunction:
    """A computation to export: `fn(frozen, *inputs)`, its frozen weights and its I/O names."""

    name: str
    fn: Callable[..., object]
    frozen: dict[str, torch.Tensor]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batched_inputs: tuple[str, ...]  # inputs whose first dimension is the batch


def frozen_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.state_dict().items()}


def head_forward_function(head: PromptedHead) -> DeviceFunction:
    def fn(frozen: dict[str, torch.Tensor], image: torch.Tensor, prompt: torch.Tensor):
        return functional_call(head, frozen, (image, prompt))

    return DeviceFunction(
        "head_forward", fn, frozen_state(head), ("image", "prompt"), ("h",), ("image",)
    )


def head_vjp_function(head: PromptedHead) -> DeviceFunction:
    def fn(
        frozen: dict[str, torch.Tensor],
        image: torch.Tensor,
        prompt: torch.Tensor,
        grad_h: torch.Tensor,
    ):
        with torch.enable_grad():
            leaf = prompt.detach().requires_grad_(True)
            h = functional_call(head, frozen, (image, leaf))
            (grad_prompt,) = torch.autograd.grad(h, leaf, grad_h)
        return grad_prompt

    return DeviceFunction(
        "head_vjp",
        fn,
        frozen_state(head),
        ("image", "prompt", "grad_h"),
        ("grad_prompt",),
        ("image", "grad_h"),
    )


def tail_step_function(tail: Tail, keys: dict[str, str]) -> DeviceFunction:
    """`keys` maps tail module names to bundle keys; gradients come out in that order."""
    names = list(keys)
    frozen = {k: v for k, v in frozen_state(tail).items() if k not in keys}

    def fn(frozen: dict[str, torch.Tensor], *args: torch.Tensor):
        params = {n: a.detach().requires_grad_(True) for n, a in zip(names, args)}
        t, labels, weight = args[len(names) :]
        with torch.enable_grad():
            t = t.detach().requires_grad_(True)
            logits = functional_call(tail, {**frozen, **params}, (t,))
            loss = weighted_cross_entropy(logits, labels, weight)
            grads = torch.autograd.grad(loss, [t, *params.values()])
        return (loss.detach(), logits.detach(), *grads)

    inputs = (*keys.values(), "tail_input", "labels", "weight")
    outputs = ("loss", "logits", "grad_tail_input", *(f"grad.{k}" for k in keys.values()))
    return DeviceFunction(
        "tail_step", fn, frozen, inputs, outputs, ("tail_input", "labels", "weight")
    )


def tail_forward_function(tail: Tail, keys: dict[str, str]) -> DeviceFunction:
    names = list(keys)
    frozen = {k: v for k, v in frozen_state(tail).items() if k not in keys}

    def fn(frozen: dict[str, torch.Tensor], *args: torch.Tensor):
        params = dict(zip(names, args))
        return functional_call(tail, {**frozen, **params}, (args[len(names)],))

    return DeviceFunction(
        "tail_forward", fn, frozen, (*keys.values(), "tail_input"), ("logits",), ("tail_input",)
    )


# --- TorchScript twins: the same computations as scriptable modules -----------------------


class HeadVJP(nn.Module):
    """(image, prompt, grad_h) -> grad_prompt, by autograd through the frozen head."""

    def __init__(self, head: PromptedHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, image: torch.Tensor, prompt: torch.Tensor, grad_h: torch.Tensor):
        leaf = prompt.detach().requires_grad_(True)
        h = self.head(image, leaf)
        grad_out: List[torch.Tensor | None] = [grad_h]
        grad = torch.autograd.grad([h], [leaf], grad_out)[0]
        assert grad is not None
        return grad


class TailStep(nn.Module):
    """(tail params, t, labels, weight) -> [loss, logits, grad_t, grads...], as the ONNX graph.

    TorchScript cannot call a module with foreign weights, so the parameters passed in are
    copied into the module's own (a few KB to a few MB: the tail is small).
    """

    def __init__(self, tail: Tail) -> None:
        super().__init__()
        self.tail = tail
        for p in self.tail.parameters():
            p.requires_grad_(True)
        # The same Parameter objects, listed again because TorchScript has no .parameters().
        self.params = nn.ParameterList(list(tail.parameters()))

    def forward(
        self,
        params: List[torch.Tensor],
        t: torch.Tensor,
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> List[torch.Tensor]:
        own = [p for p in self.params]
        with torch.no_grad():
            for p, v in zip(own, params):
                p.copy_(v)
        leaf = t.detach().requires_grad_(True)
        logits = self.tail(leaf)
        loss = weighted_cross_entropy(logits, labels, weight)
        wrt = [leaf] + own
        grads = torch.autograd.grad([loss], wrt)
        out = [loss.detach(), logits.detach()]
        for g in grads:
            assert g is not None
            out.append(g)
        return out


class TailForward(nn.Module):
    """(tail params, t) -> logits, as the ONNX graph."""

    def __init__(self, tail: Tail) -> None:
        super().__init__()
        self.tail = tail
        self.params = nn.ParameterList(list(tail.parameters()))

    def forward(self, params: List[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p, v in zip([p for p in self.params], params):
                p.copy_(v)
            return self.tail(t)
