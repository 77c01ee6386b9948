"""Buffered rounds in a real federation: a server process, device processes without torch and
a real Mosquitto, one device a straggler many times slower than the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.federation.harness import (
    ROUND_FLAGS,
    finish,
    log_text,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)

ROUNDS = 3
# 5 batches a task (3 local, 2 split: 48 images, 16 a batch, about half kept), 10 s before each:
# the straggler needs 50 s or more a task, where the others need 1.5 s (measured here). It is
# stopped once the server has finished: the test does not wait for it either.
STRAGGLER_DELAY_S = 10.0


@pytest.mark.slow
def test_buffered_rounds_go_on_without_the_straggler(small_export, broker, tmp_path: Path):
    """K = 2 of 3 devices, the third one slow: every round is made of the fast devices' updates
    and the server finishes its rounds before the straggler has finished its first task; a
    synchronous round would have waited for it."""
    shards = write_shards(tmp_path / "data", devices=3, per_device=48)
    out = tmp_path / "server"
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--test-data", str(tmp_path / "data" / "test.npz"), "--rounds", str(ROUNDS),
        "--min-devices", "3", "--round-timeout", "120", *ROUND_FLAGS,
        "--aggregation-mode", "buffered", "--buffer-size", "2",
        log=tmp_path / "server.log",
    )  # fmt: skip
    names = ["fast-0", "fast-1", "straggler"]
    delays = [0.0, 0.0, STRAGGLER_DELAY_S]
    devices = [
        start_fleet_device(
            small_export,
            broker.url,
            shard,
            name,
            tmp_path / f"{name}.log",
            "--leave-when-server-stops",
            "--request-timeout",
            "15",
            "--step-delay",
            str(delay),
        )
        for shard, name, delay in zip(shards, names, delays)
    ]
    try:
        assert finish(server, 240, tmp_path / "server.log") == 0
        straggler_log = log_text(tmp_path / "straggler.log")
    finally:
        stop_all(server, *devices)  # a device mid-exchange would wait out its request timeout
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for record in rounds:
        assert len(record["accepted"]) == 2  # K updates, all from the fast devices
        assert all(key.split("#")[0] in names[:2] for key in record["accepted"]), record
        assert 0.0 <= record["accuracy"] <= 1.0
        for key in record["accepted"]:
            stats = record["devices"][key]
            assert stats["staleness"] >= 0 and 0 < stats["staleness_weight"] <= 1
            assert stats["samples"] > 0 and stats["bytes_down_task"] > 0
    assert "round 0 started" in straggler_log  # it had a task all along...
    assert "round 0 done" not in straggler_log  # ...and had not finished it
    for a, b in zip(rounds, rounds[1:]):
        assert a["params_after"] == b["params_before"]
    # the rounds took less than the straggler's one task: nothing waited for it
    assert sum(r["seconds"] for r in rounds) < 5 * STRAGGLER_DELAY_S, rounds
