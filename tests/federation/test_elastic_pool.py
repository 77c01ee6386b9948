"""The elastic body-worker pool in a real federation: a coordinator without a body, `worker --id`
processes that announce themselves, and devices, over a real Mosquitto. Each worker receives
only its own devices' split traffic; a worker SIGKILLed mid-round hands its devices to the
live one and the round completes with every device's steps intact; a worker started later gets
devices at a later round's assignment."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_a_killed_worker_hands_its_devices_over_mid_round(
    small_export, broker, tmp_path: Path
) -> None:
    """SIGKILL the worker of a device as soon as it served a step: its Last Will moves the device
    to the live worker, the device's lost exchange is sent again (or redone from its h), and
    the round completes with every device's split steps; a worker started afterwards gets a
    device at a later round (the survivor holds both, past its share of one)."""
    ids = ["dev-a", "dev-b"]
    batches = 12  # 48 images, batch 4, all kept, one split epoch, no local epoch
    shards = write_shards(tmp_path / "data", devices=2, per_device=48)
    out = tmp_path / "server"
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2", "w3")}
    workers = {n: start_elastic_worker(small_export, broker.url, n, logs[n]) for n in ("w1", "w2")}
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "3", "--min-devices", "2", "--worker-pool", "elastic", "--batch-size", "4",
        "--keep-ratio", "1", "--local-epochs", "0", "--round-timeout", "240",
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
            "--step-delay",
            "0.75",
            "--request-timeout",
            "9",
        )  # fmt: skip
        for device_id, shard in zip(ids, shards)
    ]
    try:
        wait_for_text(logs["w1"], "serving the body to", 180)
        workers["w1"].kill()  # SIGKILL: no goodbye, only the broker's Last Will
        workers["w1"].wait()
        workers["w3"] = start_elastic_worker(small_export, broker.url, "w3", logs["w3"])
        assert finish(server, 400, tmp_path / "server.log") == 0
    finally:
        stop_all(server, *devices, *workers.values())
    server_log = log_text(tmp_path / "server.log")
    assert "worker w1 went offline" in server_log
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["accepted"] for r in rounds] == [ids] * 3
    for record in rounds:
        for device_id in ids:
            assert record["devices"][device_id]["split_steps"] == batches, record["devices"]
    moved = [d for d in ids if f"serving the body to {d}" in log_text(logs["w1"])]
    assert moved and all(f"serving the body to {d}" in log_text(logs["w2"]) for d in moved)
    assert received_by(logs["w3"]), "the late worker got no device"
