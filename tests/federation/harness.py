"""Real processes for the federation tests: a server, devices (with torch made unloadable), a
Mosquitto broker of the test's own, a small exported bundle and sklearn's digits as data."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sfprompt.export.bundle_writer import ExportConfig, ExportResult, write_bundles
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import SplitViT
from sfprompt.sim.run_split import stop_processes
from tests.conftest import SMALL_VIT

NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'timm', 'torchvision'):\n"
    "    sys.modules[name] = None  # an onnx device must train without them\n"
)
BIN = Path(sys.executable).parent


def export_small(out: Path, num_classes: int = 10, seed: int = 0) -> ExportResult:
    """A 4-block 32x32 ViT cut K=1, M=0, with a non-zero classifier so gradients are telling."""
    cfg = ExportConfig(
        model="vit_tiny_patch16_224",
        num_classes=num_classes,
        model_args=dict(SMALL_VIT),
        prompts=4,
        head_blocks=1,
        tail_blocks=0,
        batch=4,
        out=out,
        seed=seed,
    )
    torch.manual_seed(seed)
    vit = create_vit(cfg.model, num_classes, model_args=dict(SMALL_VIT))
    with torch.no_grad():
        vit.head.weight.normal_(0, 0.05)
        vit.head.bias.normal_(0, 0.05)
    return write_bundles(SplitViT.cut_model(vit, cfg.cut), cfg, progress=lambda _: None)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as 32x32 RGB uint8 images (real handwriting, shipped offline)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    big = gray.repeat(4, axis=1).repeat(4, axis=2)  # (N, 32, 32)
    return np.repeat(big[..., None], 3, axis=3), digits.target.astype(np.int64)


def write_shards(directory: Path, devices: int, per_device: int, test: int = 200) -> list[Path]:
    """One .npz per device (disjoint) plus test.npz; returns the device files."""
    images, labels = digits_images()
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "test.npz", images=images[-test:], labels=labels[-test:])
    paths = []
    for i in range(devices):
        part = slice(i * per_device, (i + 1) * per_device)
        path = directory / f"device{i}.npz"
        np.savez(path, images=images[part], labels=labels[part])
        paths.append(path)
    return paths


def start_server(*args: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [str(BIN / "sfprompt-cloud"), "serve", "--no-progress", "-v", *args]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def start_worker(*args: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [str(BIN / "sfprompt-cloud"), "worker", "-v", *args]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def start_device(*args: str, log: Path, no_torch: bool = True) -> subprocess.Popen[bytes]:
    """`sfprompt-edge start ...` in a fresh interpreter where torch cannot be imported."""
    code = (NO_TORCH if no_torch else "") + (
        "import sys\nfrom sfprompt.edge_client.cli import main\n"
        "sys.argv = ['sfprompt-edge', 'start', *sys.argv[1:]]\nmain()\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, "-v", *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def start_fleet_device(
    bundle: ExportResult, broker_url: str, shard: Path, device_id: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """One device of a test federation: the bundle's device half on one data shard."""
    return start_device(
        "--bundle", str(bundle.device_dir), "--data", str(shard), "--broker", broker_url,
        "--device-id", device_id, *extra, log=log,
    )  # fmt: skip


def metrics_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            lines.append(json.loads(line))
    return lines


def wait_for(condition, timeout: float, what: str, procs=()) -> None:  # noqa: ANN001
    """Poll `condition` until true; fail with `what` (and any dead process's log) on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def finish(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log.read_text()[-3000:]
        raise AssertionError(f"{proc.args[:3]} did not finish; log:\n{tail}") from None


def stop_all(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM every process still running, SIGKILL any that does not stop in 10 s."""
    stop_processes(list(procs), grace_s=0.0)


def eager_split(result: ExportResult) -> tuple[SplitViT, dict[str, torch.Tensor]]:
    """The exported model rebuilt in eager PyTorch from the server bundle's files, and the
    initial prompt + tail by bundle key: the reference the device and server must match."""
    from safetensors.torch import load_file

    from sfprompt.export.split_vit import Cut

    manifest = result.server
    vit = create_vit(manifest.model, manifest.num_classes, model_args=dict(manifest.model_args))
    split = SplitViT.cut_model(
        vit, Cut(manifest.head_blocks, manifest.tail_blocks, manifest.prompts)
    )
    split.head.load_state_dict(load_file(str(result.server_dir / "head.safetensors")))
    body = load_file(str(result.server_dir / "body.safetensors"))
    first = manifest.head_blocks
    split.body.load_state_dict(
        {f"blocks.{int(k.split('.')[1]) - first}.{k.split('.', 2)[2]}": v for k, v in body.items()}
    )
    params = load_file(str(result.server_dir / "prompt_tail.safetensors"))
    tail_state = {name: params[key] for name, key in split.tail_keys().items()}
    split.tail.load_state_dict(tail_state, strict=False)
    for module in (split.head, split.body, split.tail):
        module.eval()
    return split, params
