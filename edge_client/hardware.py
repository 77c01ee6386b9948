"""What a device says about itself when it joins: hardware (psutil) and software versions."""

from __future__ import annotations

import contextlib
import platform
from importlib import metadata

import psutil

from sfprompt.units import MIB


def hardware_profile() -> dict[str, float | str | bool]:
    memory = psutil.virtual_memory()
    freq = psutil.cpu_freq()
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": float(psutil.cpu_count(logical=True) or 0),
        "cpu_physical": float(psutil.cpu_count(logical=False) or 0),
        "cpu_mhz": float(freq.max or freq.current) if freq else 0.0,
        "memory_total_mb": memory.total / MIB,
        "memory_available_mb": memory.available / MIB,
    }


def runtime_versions(runtime: str) -> dict[str, str]:
    versions = {"python": platform.python_version(), "runtime": runtime}
    for package in ("sfprompt", "onnxruntime", "numpy", "paho-mqtt", "torch"):
        if package == "torch" and runtime != "torchscript":
            continue  # never import-probe torch on an onnx device
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
