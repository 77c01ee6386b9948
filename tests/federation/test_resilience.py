"""The federation survives what happens in the field: a server SIGKILLed and restarted, a
device that vanishes mid-round, a broker restarted mid-round; devices stop cleanly on SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.cloud_server.rounds import params_digest
from tests.federation.harness import (
    ROUND_FLAGS,
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)
from tests.helpers import wait_for


def devices(bundle, broker, shards, tmp_path: Path, *extra: str):
    return [
        start_fleet_device(
            bundle,
            broker.url,
            shard,
            f"dev-{i}",
            tmp_path / f"dev-{i}.log",
            "--request-timeout",
            "15",
            *extra,
        )  # fmt: skip
        for i, shard in enumerate(shards)
    ]


def restart_device(bundle, broker, shard: Path, i: int, tmp_path: Path):
    return start_fleet_device(
        bundle, broker.url, shard, f"dev-{i}", tmp_path / f"dev-{i}-again.log",
        "--request-timeout", "15", "--leave-when-server-stops",
    )  # fmt: skip


@pytest.mark.slow
def test_server_killed_and_restarted_resumes_from_its_last_round(small_export, broker, tmp_path):
    shards = write_shards(tmp_path / "data", devices=2, per_device=32)
    out = tmp_path / "server"
    args = (
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "4", "--min-devices", "2", "--round-timeout", "60", *ROUND_FLAGS,
    )  # fmt: skip
    fleet = devices(small_export, broker, shards, tmp_path)
    server = start_server(*args, log=tmp_path / "server1.log")
    try:
        wait_for(lambda: len(metrics_lines(out / "metrics.jsonl")) >= 2, 180, "two rounds")
        server.send_signal(signal.SIGKILL)
        server.wait()
        saved = load_checkpoint(out / "checkpoint.safetensors")
        assert saved is not None and saved.round >= 2
        server = start_server(*args, log=tmp_path / "server2.log")
        assert finish(server, 240, tmp_path / "server2.log") == 0
        for proc in fleet:  # SIGTERM: devices leave cleanly
            proc.send_signal(signal.SIGTERM)
        for i, proc in enumerate(fleet):
            assert finish(proc, 30, tmp_path / f"dev-{i}.log") == 0
    finally:
        stop_all(server, *fleet)
    final = load_checkpoint(out / "checkpoint.safetensors")
    assert final is not None and final.round == 4
    assert [r["round"] for r in final.history] == [1, 2, 3, 4]
    assert final.history[: saved.round] == saved.history  # nothing completed was redone
    resumed = final.history[saved.round]
    assert resumed["params_before"] == params_digest(saved.params)  # identical parameters


@pytest.mark.slow
def test_devices_that_vanish_mid_round_do_not_stall_the_federation(small_export, broker, tmp_path):
    """Mid-round one device is SIGKILLed (the broker publishes its Last Will) and one freezes
    silently (SIGSTOP: no Will until its keep-alive runs out). The round ends by its deadline
    with the surviving device's update; then the frozen one wakes up, the killed one is
    restarted (as systemd would), and the next round completes with all three."""
    shards = write_shards(tmp_path / "data", devices=3, per_device=200)  # rounds of seconds
    out = tmp_path / "server"
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "2", "--min-devices", "3", "--round-timeout", "40", "--offline-grace", "3",
        *ROUND_FLAGS, "--batch-size", "8", log=tmp_path / "server.log",
    )  # fmt: skip
    fleet = devices(small_export, broker, shards, tmp_path, "--leave-when-server-stops")
    try:
        wait_for(lambda: "round 1:" in (tmp_path / "server.log").read_text(), 120, "round 1")
        fleet[1].send_signal(signal.SIGSTOP)
        fleet[2].send_signal(signal.SIGKILL)
        wait_for(lambda: metrics_lines(out / "metrics.jsonl"), 60, "the end of round 1")
        fleet[1].send_signal(signal.SIGCONT)
        fleet[2] = restart_device(small_export, broker, shards[2], 2, tmp_path)
        assert finish(server, 150, tmp_path / "server.log") == 0
        for i, proc in enumerate(fleet):
            assert finish(proc, 30, tmp_path / f"dev-{i}.log") == 0
    finally:
        fleet[1].send_signal(signal.SIGCONT)
        stop_all(server, *fleet)
    first, second = metrics_lines(out / "metrics.jsonl")
    assert first["selected"] == ["dev-0", "dev-1", "dev-2"]
    assert first["accepted"] == ["dev-0"]
    assert 40 <= first["seconds"] < 40 + 8  # the deadline, not the missing devices, ended it
    assert second["accepted"] == ["dev-0", "dev-1", "dev-2"]


@pytest.mark.slow
def test_a_broker_restarted_mid_round_does_not_stop_the_federation(small_export, broker, tmp_path):
    shards = write_shards(tmp_path / "data", devices=2, per_device=160)  # rounds of seconds
    out = tmp_path / "server"
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "3", "--min-devices", "2", "--round-timeout", "90", *ROUND_FLAGS,
        "--batch-size", "8",
        log=tmp_path / "server.log",
    )  # fmt: skip
    fleet = devices(small_export, broker, shards, tmp_path, "--leave-when-server-stops")
    try:
        wait_for(lambda: len(metrics_lines(out / "metrics.jsonl")) >= 1, 180, "round 1")
        time.sleep(0.5)  # round 2 under way
        broker.stop()
        time.sleep(2.0)
        broker.start()
        assert finish(server, 300, tmp_path / "server.log") == 0
        for i, proc in enumerate(fleet):
            assert finish(proc, 60, tmp_path / f"dev-{i}.log") == 0
    finally:
        stop_all(server, *fleet)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["accepted"] == ["dev-0", "dev-1"]
