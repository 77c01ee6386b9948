"""The elastic body-worker pool in a real federation: a coordinator without a body, `worker --id`
processes that announce themselves, and devices, over a real Mosquitto. Each worker receives
only its own devices' split traffic; a worker SIGKILLed mid-round hands its devices to the
live one, the round completes with every device's steps intact and the parameters of the same
federation without the kill; a worker started later gets devices at a later round's
assignment."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.export.bundle_writer import WEIGHTS_FILE
from sfprompt.protocol.broker import EmbeddedBroker
from tests.federation.harness import (
    finish,
    log_text,
    metrics_lines,
    start_fleet_device,
    start_server,
    start_worker,
    stop_all,
    write_shards,
)


def start_elastic_worker(export, broker_url: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    return start_worker(
        "--bundle", str(export.server_dir), "--broker", broker_url, "--id", name, log=log
    )  # fmt: skip


def received_by(log: Path) -> dict[str, int]:
    """The worker's own count of split messages that reached it, by device (logged at exit)."""
    line = re.search(r"split messages received: (.*)", log_text(log))
    assert line is not None, f"no count in {log}:\n{log_text(log)[-2000:]}"
    return {device: int(count) for device, count in re.findall(r"(\S+) (\d+)", line.group(1))}


def wait_for_text(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_text(log):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{text!r} not in {log} within {timeout}s:\n{log_text(log)[-2000:]}"
            )
        time.sleep(0.2)


@pytest.mark.slow
def test_each_elastic_worker_receives_only_its_devices_traffic(
    small_export, broker, tmp_path: Path
) -> None:
    ids = [f"dev-{i}" for i in range(4)]
    shards = write_shards(tmp_path / "data", devices=4, per_device=32)
    out = tmp_path / "server"
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    workers = [start_elastic_worker(small_export, broker.url, n, p) for n, p in logs.items()]
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "2", "--min-devices", "4", "--worker-pool", "elastic", "--batch-size", "16",
        log=tmp_path / "server.log",
    )  # fmt: skip
    devices = [
        start_fleet_device(
            small_export,
            broker.url,
            shard,
            device_id,
            tmp_path / f"{device_id}.log",
            "--leave-when-server-stops",
        )  # fmt: skip
        for device_id, shard in zip(ids, shards)
    ]
    try:
        assert finish(server, 300, tmp_path / "server.log") == 0
    finally:
        stop_all(server, *devices, *workers)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["accepted"] for r in rounds] == [ids] * 2
    seen = {name: received_by(log) for name, log in logs.items()}
    assert set(seen["w1"]).isdisjoint(seen["w2"]), seen
    assert set(seen["w1"]) | set(seen["w2"]) == set(ids), seen
    assert sorted(len(s) for s in seen.values()) == [2, 2], seen  # balanced, and sticky
    for device_id in ids:
        served = [
            n for n, log in logs.items() if f"serving the body to {device_id}" in log_text(log)
        ]
        assert len(served) == 1, (device_id, served)


def run_two_device_fleet(export, root: Path, kill_w1: bool) -> tuple[list[dict], Path]:
    """Three rounds of two devices on workers w1 + w2 over a broker of their own, every device
    a slow one (0.75 s between its z and its dL/dz); with `kill_w1`, w1 is SIGKILLed right after
    it served its first forward (so inside that step's exchange) and w3 starts. Returns the
    rounds' metrics and the server's out directory (logs beside it)."""
    shards = write_shards(root / "data", devices=2, per_device=48)
    out = root / "server"
    logs = {name: root / f"{name}.log" for name in ("w1", "w2", "w3")}
    with EmbeddedBroker(root / "broker") as broker:
        broker.start()
        workers = {n: start_elastic_worker(export, broker.url, n, logs[n]) for n in ("w1", "w2")}
        server = start_server(
            "--bundle", str(export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "3", "--min-devices", "2", "--worker-pool", "elastic", "--batch-size",
            "4", "--keep-ratio", "1", "--local-epochs", "0", "--round-timeout", "240",
            log=root / "server.log",
        )  # fmt: skip
        devices = [
            start_fleet_device(
                export,
                broker.url,
                shard,
                device_id,
                root / f"{device_id}.log",
                "--leave-when-server-stops",
                "--step-delay",
                "0.75",
                "--request-timeout",
                "9",
            )  # fmt: skip
            for device_id, shard in zip(DEVICES, shards)
        ]
        try:
            if kill_w1:
                wait_for_text(logs["w1"], "serving the body to", 180)
                workers["w1"].kill()  # SIGKILL: no goodbye, only the broker's Last Will
                workers["w1"].wait()
                workers["w3"] = start_elastic_worker(export, broker.url, "w3", logs["w3"])
            assert finish(server, 400, root / "server.log") == 0
        finally:
            stop_all(server, *devices, *workers.values())
    return metrics_lines(out / "metrics.jsonl"), out


DEVICES = ["dev-a", "dev-b"]


@pytest.mark.slow
def test_a_killed_worker_hands_its_devices_over_mid_round(small_export, tmp_path: Path) -> None:
    """SIGKILL the worker of a device inside its first exchange: its Last Will moves the device
    to the live worker, the device redoes the lost exchange there, and the round completes with
    every device's split steps and the parameters of the same federation without the kill; a
    worker started afterwards gets a device at a later round (the survivor holds both, past its
    share of one)."""
    batches = 12  # 48 images, batch 4, all kept, one split epoch, no local epoch
    reference, reference_out = run_two_device_fleet(small_export, tmp_path / "calm", False)
    rounds, out = run_two_device_fleet(small_export, tmp_path / "kill", True)
    logs = tmp_path / "kill"
    assert "worker w1 went offline" in log_text(logs / "server.log")
    for record in rounds:
        assert record["accepted"] == DEVICES
        for device_id in DEVICES:
            assert record["devices"][device_id]["split_steps"] == batches, record["devices"]
    moved = [d for d in DEVICES if f"serving the body to {d}" in log_text(logs / "w1.log")]
    assert moved and all(f"serving the body to {d}" in log_text(logs / "w2.log") for d in moved)
    redone = [d for d in moved if "was lost on the server" in log_text(logs / f"{d}.log")]
    assert redone, "the kill fell between exchanges: no step was redone"
    assert received_by(logs / "w3.log"), "the late worker got no device"
    # No gradient lost or applied twice: the killed run ends where the calm one does (measured:
    # bit for bit; the tolerance allows for the body batching other devices' rows differently).
    assert [r["accepted"] for r in reference] == [DEVICES] * 3
    calm = load_checkpoint(reference_out / "checkpoint.safetensors")
    killed = load_checkpoint(out / "checkpoint.safetensors")
    assert calm is not None and killed is not None and calm.round == killed.round == 3
    for key, value in calm.params.items():
        np.testing.assert_allclose(killed.params[key], value, rtol=0, atol=1e-4, err_msg=key)
    initial = load_file(str(small_export.device_dir / WEIGHTS_FILE))
    moved_most = max(float(np.abs(calm.params[k] - initial[k]).max()) for k in initial)
    assert moved_most > 1e-3, "training did not move the parameters: the comparison is empty"
