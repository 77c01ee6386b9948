"""The head's training pass as two graphs, so that a device never runs the head forward twice.

    head_tape_forward  (image, prompt)          -> h, tape.0, tape.1, ...
    head_tape_backward (grad_h, tape.0, ...)    -> grad_prompt

`head_vjp` recomputes the whole head forward before differentiating it: a third of the head's
work done twice per batch. Here AOTAutograd splits the head's joint forward + backward instead:
`torch.compile` traces the head with a symbolic batch, its min-cut partitioner picks what the
forward keeps for the backward (the tape: attention probabilities, the MLP's pre-activation,
...; never a weight, which the backward holds itself), and each half becomes a plain module that
`onnx_export` writes like any other graph. The device keeps the tape of one batch between its
two calls: about 7.8 MB per sample for one ViT-Base block at 10 prompts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch import fx, nn
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from sfprompt.protocol.bundle import TAPE_GRAPHS

from .onnx_export import save_module_onnx
from .split_vit import PromptedHead


@dataclass(frozen=True)
class Saved:
    """One value the forward hands its backward: a constant (weight), the batch size or an
    expression of it, or a tensor whose first dimension is `rows_per_sample` x the batch."""

    kind: str  # "constant", "size" or "tape"
    constant: int = -1  # index into the forward's inputs, for "constant"
    size: sympy.Expr | None = None  # for "size": an integer polynomial of the batch symbol
    rows_per_sample: int = 1  # for "tape"


@dataclass
class HeadPartition:
    """The head's forward and backward graphs as AOTAutograd split them, and how they connect."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    roles: list[str]  # per forward input: "batch", "image", "prompt" or "constant"
    constants: dict[int, torch.Tensor]  # forward input index -> frozen weight or buffer
    saved: dict[str, Saved]  # backward input name -> where its value comes from
    batch: sympy.Symbol


class PartitionError(RuntimeError):
    """The head's graphs could not be split into a forward with a tape and a backward."""


def _symbol(value: object) -> sympy.Expr:
    return (
        sympy.sympify(value.node.expr) if isinstance(value, torch.SymInt) else sympy.Integer(value)
    )


def _rows_per_sample(shape: torch.Size, batch: sympy.Symbol, name: str) -> int:
    """How many rows of a tape tensor each sample owns: its first dimension is k * batch."""
    first = _symbol(shape[0])
    rows = sympy.simplify(first / batch)
    later = [d for d in shape[1:] if _symbol(d).free_symbols]
    if rows.free_symbols or not rows.is_integer or later:
        raise PartitionError(f"tape tensor {name} has shape {list(shape)}: not (k x batch, ...)")
    return int(rows)


def evaluate_size(expr: sympy.Expr, batch: sympy.Symbol, value: int | torch.SymInt) -> object:
    """An integer polynomial of the batch symbol at `value`, by plain arithmetic, so that
    torch.export keeps it symbolic when `value` is."""
    poly = sympy.Poly(expr, batch)
    result: object = 0
    for (power,), coeff in poly.terms():
        if not coeff.is_integer:
            raise PartitionError(f"size {expr} is not an integer polynomial of the batch")
        term: object = int(coeff)
        for _ in range(power):
            term = term * value  # type: ignore[operator]
        result = result + term  # type: ignore[operator]
    return result


class RowGroups(nn.Module):
    """A per-token `fn` applied to each group of rows (tokens) on its own, every group but
    `differentiated` detached: the same values, and a backward through `fn` for that group's
    rows alone. Exact for the gradient of whatever only that group depends on."""

    def __init__(self, fn: nn.Module, bounds: tuple[int, int], differentiated: int) -> None:
        super().__init__()
        self.fn = fn
        self.bounds = bounds  # row indices where the second and the third group start
        self.differentiated = differentiated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        edges = (0, *self.bounds, x.shape[1])
        parts = [
            self.fn(x[:, a:b] if i == self.differentiated else x[:, a:b].detach())
            for i, (a, b) in enumerate(zip(edges, edges[1:]))
            if b > a
        ]
        return torch.cat(parts, dim=1)


def prompt_rows_only(head: PromptedHead, prompts: int) -> PromptedHead:
    """A copy of `head` whose first block runs norm1 + qkv for prefix, prompt and patch rows
    apart, differentiating the prompt rows only. Only those rows of that block's input depend
    on the prompt (the others come from the image and frozen weights), so the gradient of the
    prompt is unchanged and the backward skips the largest product it would waste: dL/dx of
    every other row through qkv (~20% of the backward at one ViT-Base block). For the prompt's
    gradient only: nothing else is differentiated on a device. Left as it is when the block is
    not timm's plain `Block` with an `Attention` that reads its input through `qkv` alone."""
    from timm.models.vision_transformer import Attention, Block

    block = head.blocks[0] if len(head.blocks) else None
    if prompts < 1 or type(block) is not Block or type(block.attn) is not Attention:
        return head
    rows = copy.deepcopy(head)
    first = rows.blocks[0]
    bounds = (rows.num_prefix, rows.num_prefix + prompts)
    first.attn.qkv = RowGroups(nn.Sequential(first.norm1, first.attn.qkv), bounds, 1)
    first.norm1 = nn.Identity()
    return rows


def partition_head(head: PromptedHead, image: torch.Tensor, prompt: torch.Tensor) -> HeadPartition:
    """Trace `head` on an example batch (size >= 2 and equal to no other dimension) and split it.

    Raises `PartitionError` when the split does not have the shape the device runtime needs.
    """
    captured: dict[str, object] = {}

    def keep(name: str):
        def compiler(gm: fx.GraphModule, example: object):
            captured[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    def backend(gm: fx.GraphModule, example: list[object]):
        captured["inputs"] = list(example)
        return aot_module_simplified(
            gm,
            example,
            fw_compiler=keep("forward"),
            bw_compiler=keep("backward"),
            partition_fn=min_cut_rematerialization_partition,
        )

    frozen = [p.requires_grad for p in head.parameters()]
    head.requires_grad_(False)
    image = image.detach().clone()
    prompt = prompt.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    torch._dynamo.mark_dynamic(image, 0)
    try:
        compiled = torch.compile(head, backend=backend, dynamic=False, fullgraph=True)
        h = compiled(image, prompt)
        h.backward(torch.ones_like(h))
    finally:
        torch._dynamo.reset()
        for p, flag in zip(head.parameters(), frozen):
            p.requires_grad_(flag)
    return _connect(captured, image, prompt)


def _connect(
    captured: dict[str, object], image: torch.Tensor, prompt: torch.Tensor
) -> HeadPartition:
    forward, backward = captured["forward"], captured["backward"]
    assert isinstance(forward, fx.GraphModule) and isinstance(backward, fx.GraphModule)
    inputs = captured["inputs"]
    assert isinstance(inputs, list)
    placeholders = forward.graph.find_nodes(op="placeholder")
    roles, constants, batch = [], {}, None
    for i, (node, value) in enumerate(zip(placeholders, inputs, strict=True)):
        if isinstance(value, torch.SymInt):
            roles.append("batch")
            batch = _symbol(node.meta["val"])
        elif value is image:
            roles.append("image")
        elif value is prompt:
            roles.append("prompt")
        else:
            roles.append("constant")
            constants[i] = value.detach().clone()
    if not isinstance(batch, sympy.Symbol):
        raise PartitionError("the batch dimension was not traced as a symbol")
    index = {node.name: i for i, node in enumerate(placeholders)}
    outputs = next(n for n in forward.graph.nodes if n.op == "output").args[0]
    saved = {}
    for node in outputs[1:]:
        value = node.meta["val"]
        if node.op == "placeholder" and roles[index[node.name]] == "constant":
            saved[node.name] = Saved("constant", constant=index[node.name])
        elif isinstance(value, torch.SymInt):
            saved[node.name] = Saved("size", size=_symbol(value))
        elif node.op == "placeholder":  # the image or the prompt itself
            raise PartitionError(f"the backward needs the forward's input {node.name}")
        else:
            saved[node.name] = Saved(
                "tape", rows_per_sample=_rows_per_sample(value.shape, batch, node.name)
            )
    return HeadPartition(forward, backward, roles, constants, saved, batch)


class _Constants(nn.Module):
    """The forward's frozen inputs as buffers, so that export writes them as initializers."""

    def __init__(self, part: HeadPartition) -> None:
        super().__init__()
        self.part = part
        for i, value in part.constants.items():
            self.register_buffer(f"constant_{i}", value)

    def constant(self, i: int) -> torch.Tensor:
        return getattr(self, f"constant_{i}")


class TapeForward(_Constants):
    """(image, prompt) -> (h, *tape): the head forward, keeping what its backward needs."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image, prompt = inputs  # one *inputs signature for every exported module
        given = {"batch": image.shape[0], "image": image, "prompt": prompt}
        args = [
            self.constant(i) if role == "constant" else given[role]
            for i, role in enumerate(self.part.roles)
        ]
        h, *rest = self.part.forward(*args)
        kinds = [s.kind for s in self.part.saved.values()]
        return (h, *(v for v, kind in zip(rest, kinds, strict=True) if kind == "tape"))


class TapeBackward(_Constants):
    """(grad_h, *tape) -> grad_prompt: the head's backward from the forward's tape."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        grad_h, *tape = inputs
        batch = grad_h.shape[0]
        names = [name for name, s in self.part.saved.items() if s.kind == "tape"]
        kept = dict(zip(names, tape, strict=True))
        args = []
        for node in self.part.backward.graph.find_nodes(op="placeholder"):
            s = self.part.saved.get(node.name)
            if s is None:  # the tangent: dL/dh
                args.append(grad_h)
            elif s.kind == "constant":
                args.append(self.constant(s.constant))
            elif s.kind == "size":
                assert s.size is not None
                args.append(evaluate_size(s.size, self.part.batch, batch))
            else:
                args.append(kept[node.name])
        grads = self.part.backward(*args)
        return grads[self.part.roles.index("prompt")]

    def tape_rows(self) -> list[int]:
        """Rows per sample of each tape tensor, in order (its first dimension is rows x batch)."""
        return [s.rows_per_sample for s in self.part.saved.values() if s.kind == "tape"]


def export_head_tape(
    head: PromptedHead, image: torch.Tensor, prompt: torch.Tensor, directory: Path
) -> dict[str, Path]:
    """Write `head_tape_forward.onnx` and `head_tape_backward.onnx` of `head` into `directory`.

    `image` is an example batch (size >= 2 and equal to no other dimension of the model).
    """
    part = partition_head(prompt_rows_only(head, prompt.shape[0]), image, prompt)
    return export_tape_pair(part, image, prompt, directory, TAPE_GRAPHS, "h")


def export_tape_pair(
    part: HeadPartition,
    image: torch.Tensor,
    prompt: torch.Tensor,
    directory: Path,
    names: tuple[str, str],
    output: str,
) -> dict[str, Path]:
    """Write a partition's forward (image, prompt -> `output`, tape...) and backward
    (grad_`output`, tape... -> grad_prompt) as the graphs `names` in `directory`."""
    forward, backward = TapeForward(part).eval(), TapeBackward(part).eval()
    with torch.no_grad():
        out, *tape = forward(image, prompt)
    tapes = tuple(f"tape.{i}" for i in range(len(tape)))
    paths = {name: Path(directory) / f"{name}.onnx" for name in names}
    save_module_onnx(
        forward, (image, prompt), ("image", "prompt"), (output, *tapes), {"image": 1},
        paths[names[0]],
    )  # fmt: skip
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    save_module_onnx(
        backward,
        (grad, *tape),
        (f"grad_{output}", *tapes),
        ("grad_prompt",),
        {f"grad_{output}": 1, **dict(zip(tapes, backward.tape_rows()))},
        paths[names[1]],
    )
    return paths
