"""The edge install stays free of PyTorch, and the parts import under one namespace."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.parametrize(
    ("module", "command"),
    [
        ("sfprompt.cloud_server.cli", ["serve", "--help"]),
        ("sfprompt.cloud_server.cli", ["broker-config", "--help"]),
        ("sfprompt.export.cli", ["bundle", "--help"]),
        ("sfprompt.export.cli", ["plan", "--help"]),
        ("sfprompt.edge_client.cli", ["start", "--help"]),
        ("sfprompt.sim.cli", ["--help"]),
    ],
)
def test_every_command_teaches_without_torch(module: str, command: list[str]) -> None:
    """Options come from torch-free config modules: `--help` answers at once, anywhere."""
    code = NO_TORCH + f"from {module} import main\nmain({command!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout


def test_the_edge_extra_lists_no_torch_timm_torchvision_or_matplotlib() -> None:
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
    assert "matplotlib" not in names | core, "a headless device draws no plots: sfprompt[plots]"


def test_no_generic_top_level_module_is_installed() -> None:
    for generic in ("export", "protocol", "edge_client", "cloud_server", "data", "sim"):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {generic}"], capture_output=True, cwd="/", text=True
        )
        assert proc.returncode != 0, f"'{generic}' is importable as a top-level module"


def test_import_contracts_hold() -> None:
    """import-linter's contracts (pyproject.toml), run on the checkout as `make lint` runs them:
    the protocol and the data part import no other part and no torch; the edge client imports no
    torch (but its TorchScript runtime); the server never imports the ONNX exporter."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_checkout_resolves_sfprompt_before_any_install() -> None:
    """`sfprompt.<part>` names the checkout's files with no install: `-S` skips site-packages'
    .pth files (so no editable-install finder), and only the dependencies are put on the path."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = "import sfprompt.protocol.messages as m, sys; print(m.__file__)"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "sfprompt" / "protocol" / "messages.py"


def test_a_part_refuses_its_bare_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import protocol.messages"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode != 0
    assert "import this part as sfprompt.protocol" in proc.stderr


def test_no_import_cycle_between_modules() -> None:
    """Function-local imports count: a cycle hidden behind one is still a cycle."""
    import grimp

    graph = grimp.build_graph("sfprompt", cache_dir=None)
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def _strongly_connected(graph) -> list[set[str]]:  # noqa: ANN001
    """Tarjan's algorithm over grimp's module graph (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def imports_of(module: str):  # noqa: ANN202
        return iter(sorted(graph.find_modules_directly_imported_by(module)))

    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, imports_of(root))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, imports_of(child)))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found
