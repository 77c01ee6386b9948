"""A device's own floor against a curious server, in a real federation: a server that asks for
no defense gets no h from a device that requires one, and the round ends without waiting for
it, with the device's reason in the round's metrics."""

from __future__ import annotations

import time
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


@pytest.mark.slow
def test_a_device_sits_out_a_round_below_its_floor_and_the_round_goes_on(
    small_export, broker, tmp_path: Path
) -> None:
    shards = write_shards(tmp_path / "data", devices=2, per_device=32)
    out = tmp_path / "server"
    timeout_s = 300  # the round must end long before it: the device said it will not come
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
        "--rounds", "1", "--min-devices", "2", "--round-timeout", str(timeout_s), *ROUND_FLAGS,
        log=tmp_path / "server.log",
    )  # fmt: skip
    floors = {"dev-open": (), "dev-careful": ("--require-noise", "0.1")}
    devices = [
        start_fleet_device(
            small_export,
            broker.url,
            shard,
            name,
            tmp_path / f"{name}.log",
            "--leave-when-server-stops",
            *floor,
        )  # fmt: skip
        for (name, floor), shard in zip(floors.items(), shards)
    ]
    started = time.monotonic()
    try:
        assert finish(server, 240, tmp_path / "server.log") == 0
    finally:
        stop_all(server, *devices)
    assert time.monotonic() - started < timeout_s
    (record,) = metrics_lines(out / "metrics.jsonl")
    assert record["accepted"] == ["dev-open"]
    ((device, why),) = record["missing"]
    assert device == "dev-careful" and "h clipped and noised at sigma >= 0.1" in why
    assert "serving the body to dev-careful" not in log_text(tmp_path / "server.log")
