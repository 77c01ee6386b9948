"""Real processes for the federation tests: a server, devices (with torch made unloadable),
their logs and metrics, and sklearn's digits as data. The bundle is `small_export`
(tests/conftest.py) and the broker the test's own (`broker`, or an `EmbeddedBroker`)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil

from sfprompt.export.bundle_writer import ExportResult
from sfprompt.sim.run_split import stop_processes

NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'timm', 'torchvision'):\n"
    "    sys.modules[name] = None  # an onnx device must train without them\n"
)
BIN = Path(sys.executable).parent
# A small, quick round: what the federation tests that are not about training settings run.
ROUND_FLAGS = ("--batch-size", "16", "--keep-ratio", "0.5")
ROUND_FLAGS += ("--local-lr", "0.01", "--split-lr", "0.05")


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


def log_text(log: Path) -> str:
    """A process's log so far ("" before it is created)."""
    return log.read_text(errors="replace") if log.exists() else ""


def brokers_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The Mosquitto processes a server process started (its embedded broker)."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "mosquitto" in p.name()]


def metrics_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            lines.append(json.loads(line))
    return lines


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
