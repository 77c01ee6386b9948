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
        "sfprompt.edge_client.device",
        "sfprompt.edge_client.cli",
        "sfprompt.edge_client.phases",
        "sfprompt.data.datasets",
        "sfprompt.data.transforms",
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
    for generic in ("export", "protocol", "edge_client", "cloud_server", "data", "sim"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {generic}"], capture_output=True, cwd="/", text=True
        )
        assert proc.returncode != 0, f"'{generic}' is importable as a top-level module"


def test_import_contracts_hold(tmp_path) -> None:
    """import-linter's contracts (pyproject.toml): the protocol and the data part import no
    other part and no torch; the edge client imports no torch (but its TorchScript runtime).

    The parts are installed through a package-dir mapping that import-linter cannot follow,
    so the check runs over a tree of links laid out as the installed namespace.
    """
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    package = tmp_path / "sfprompt"
    package.mkdir()
    for file in (root / "sfprompt").glob("*.py"):
        shutil.copy(file, package / file.name)
    for part in ("export", "protocol", "edge_client", "cloud_server", "data", "sim"):
        (package / part).symlink_to(root / part)
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run(
        [str(lint), str(root / "pyproject.toml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout
