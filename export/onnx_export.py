"""Write a `DeviceFunction` as an ONNX graph with a dynamic batch dimension.

The function is first traced by `make_fx` with symbolic shapes (this is what lets autograd's
backward ops into a graph), then exported by `torch.onnx.export(dynamo=True)`. Its frozen
weights become initializers; only standard ONNX-domain operators come out, so the stock
onnxruntime wheel runs the graph on x86-64 and aarch64 alike.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from .cut_manifest import OPSET
from .device_graphs import DeviceFunction


class _Frozen(nn.Module):
    """Holds the frozen weights as buffers so that export turns them into initializers."""

    def __init__(self, traced: nn.Module, frozen: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.traced = traced
        self.keys = list(frozen)
        self.slots = [re.sub(r"\W", "_", k) for k in self.keys]
        for slot, value in zip(self.slots, frozen.values()):
            self.register_buffer(slot, value.detach().clone())

    def forward(self, *inputs: torch.Tensor):
        frozen = {k: getattr(self, s) for k, s in zip(self.keys, self.slots)}
        return self.traced(frozen, *inputs)


def export_onnx(spec: DeviceFunction, example: dict[str, torch.Tensor], path: Path) -> None:
    """Trace `spec` on `example` inputs (batch >= 2, unlike any other dimension) and save it.

    Raises RuntimeError from torch if the function cannot be traced or exported.
    """
    args = tuple(example[name] for name in spec.input_names)
    traced = make_fx(spec.fn, tracing_mode="symbolic")(spec.frozen, *args)
    module = _Frozen(traced, spec.frozen).eval()
    rows = {n: 1 for n in spec.batched_inputs}
    save_module_onnx(module, args, spec.input_names, spec.output_names, rows, path)


def save_module_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    batch_rows: dict[str, int],
    path: Path,
) -> None:
    """Export `module(*args)` with a dynamic batch: input `n` has `batch_rows[n]` x batch rows
    (absent: no batch dimension). Its buffers become initializers."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = tuple(
        ({0: batch if batch_rows[n] == 1 else batch * batch_rows[n]} if n in batch_rows else None)
        for n in input_names
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=(dynamic,),  # one entry: forward takes *inputs
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    model = program.model_proto
    model.producer_name = "sfprompt"
    onnx.save_model(model, str(path))
