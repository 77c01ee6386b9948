"""TorchScript twins of the device graphs, for devices that have PyTorch (e.g. a Jetson).

Scripted, not traced: scripting keeps the batch dimension dynamic and keeps autograd calls.
Each twin takes the same inputs as its ONNX graph; the tail twins take the trainable tail
parameters as one list, in the manifest's order.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .device_graphs import HeadVJP, TailForward, TailStep
from .split_vit import SplitViT


def _save_scripted(module: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still shipped
        scripted = torch.jit.script(module)
        torch.jit.save(scripted, str(path))


def export_torchscript(split: SplitViT, directory: Path) -> dict[str, str]:
    """Write the four twins into `directory`; returns graph name -> file name."""
    head = copy.deepcopy(split.head)
    tail = copy.deepcopy(split.tail)
    modules: dict[str, nn.Module] = {
        "head_forward": head,
        "head_vjp": HeadVJP(head),
        "tail_step": TailStep(tail),
        "tail_forward": TailForward(copy.deepcopy(split.tail)),
    }
    files = {}
    for name, module in modules.items():
        files[name] = f"{name}.pt"
        _save_scripted(module.eval(), Path(directory) / files[name])
    return files
