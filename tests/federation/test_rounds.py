"""A real federation: a server process, device processes without torch, a real Mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.federation.harness import (
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)


@pytest.fixture(scope="module")
def bundle(small_export):
    return small_export


@pytest.mark.slow
def test_three_devices_finish_rounds_against_the_real_server(bundle, broker, tmp_path: Path):
    """Rounds complete with every device's update averaged, the model evaluated after each
    round, and the bytes and memory of each device reported."""
    shards = write_shards(tmp_path / "data", devices=3, per_device=48)
    out = tmp_path / "server"
    server = start_server(
        "--bundle", str(bundle.server_dir), "--broker", broker.url, "--out", str(out),
        "--test-data", str(tmp_path / "data" / "test.npz"), "--rounds", "2",
        "--min-devices", "3", "--round-timeout", "120", "--batch-size", "16",
        "--keep-ratio", "0.5", "--prune", "global",  # ceil(0.5 n): 24 of 48 (per class: more)
        "--local-epochs", "1", "--local-lr", "0.01", "--split-lr", "0.05",
        log=tmp_path / "server.log",
    )  # fmt: skip
    devices = [
        start_fleet_device(
            bundle,
            broker.url,
            shard,
            f"dev-{i}",
            tmp_path / f"dev-{i}.log",
            "--leave-when-server-stops",
        )  # fmt: skip
        for i, shard in enumerate(shards)
    ]
    try:
        assert finish(server, 240, tmp_path / "server.log") == 0
        for i, device in enumerate(devices):
            assert finish(device, 60, tmp_path / f"dev-{i}.log") == 0
    finally:
        stop_all(server, *devices)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["accepted"] == ["dev-0", "dev-1", "dev-2"]
        assert 0.0 <= record["accuracy"] <= 1.0 and record["loss"] > 0
        assert record["eval_samples"] == 200  # all of test.npz: fewer than --eval-samples 2000
        for stats in record["devices"].values():
            assert stats["samples"] == 24  # keep ratio 0.5 of 48
            assert stats["bytes_up_split"] > 0 and stats["bytes_down_split"] > 0
            assert stats["bytes_down_task"] > 0 and stats["peak_rss_mb"] > 0
    assert rounds[0]["params_after"] == rounds[1]["params_before"]
    assert rounds[1]["params_after"] != rounds[0]["params_before"]
