"""The edge install stays free of PyTorch, and the parts import under one namespace."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires

import pytest

NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'timm', 'torchvision'):\n"
    "    sys.modules[name] = None  # any import of them now raises ImportError\n"
)


@pytest.mark.parametrize(
    "module",
    [
        "sfprompt.protocol",
        "sfprompt.protocol.bundle",
        "sfprompt.edge_client",
        "sfprompt.edge_client.onnx_runtime",
        "sfprompt.edge_client.local_step",
        "sfprompt.edge_client.profile",
        "sfprompt.edge_client.tail_input",
    ],
)
def test_edge_modules_import_where_torch_cannot(module: str) -> None:
    code = (
        NO_TORCH
        + f"import {module}\nassert 'torch' not in [m for m in sys.modules if sys.modules[m]]"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_edge_extra_lists_no_torch_timm_or_torchvision() -> None:
    edge = [r for r in requires("sfprompt") or [] if 'extra == "edge"' in r]
    assert edge, "the edge extra is missing"
    names = {
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in edge
    }
    core = {
        r.split(";")[0].split(">")[0].strip().lower()
        for r in requires("sfprompt")
        if "extra" not in r
    }
    assert "onnxruntime" in names
    assert not (names | core) & {"torch", "timm", "torchvision"}


def test_no_generic_top_level_module_is_installed() -> None:
    for generic in ("export", "protocol", "edge_client", "cloud_server"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {generic}"], capture_output=True, cwd="/", text=True
        )
        assert proc.returncode != 0, f"'{generic}' is importable as a top-level module"
