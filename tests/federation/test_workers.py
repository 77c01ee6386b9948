"""Scale-out: the coordinator holds no body; two `sfprompt-cloud worker` processes share the
devices by a stable assignment, and each device's backward pass reaches the worker that holds
its state."""

from __future__ import annotations

from pathlib import Path

import pytest

from sfprompt.cloud_server.body_service import worker_of
from sfprompt.protocol.broker import EmbeddedBroker
from tests.federation.harness import (
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    start_worker,
    stop_all,
    write_shards,
)


def device_ids_for(workers: int) -> list[str]:
    """One device id per worker."""
    ids: dict[int, str] = {}
    n = 0
    while len(ids) < workers:
        ids.setdefault(worker_of(f"dev-{n}", workers), f"dev-{n}")
        n += 1
    return [ids[w] for w in range(workers)]


@pytest.mark.slow
def test_two_body_workers_serve_their_own_devices(small_export, tmp_path: Path) -> None:
    ids = device_ids_for(2)
    shards = write_shards(tmp_path / "data", devices=2, per_device=32)
    out = tmp_path / "server"
    with EmbeddedBroker(tmp_path / "broker") as broker:
        broker.start()
        workers = [
            start_worker(
                "--bundle",
                str(small_export.server_dir),
                "--broker",
                broker.url,
                "--index",
                str(i),
                "--of",
                "2",
                log=tmp_path / f"worker{i}.log",
            )  # fmt: skip
            for i in range(2)
        ]
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "2", "--min-devices", "2", "--body-workers", "2", "--batch-size", "16",
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
            assert finish(server, 240, tmp_path / "server.log") == 0
        finally:
            stop_all(server, *devices, *workers)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["accepted"] for r in rounds] == [sorted(ids)] * 2
    for index, device_id in enumerate(ids):
        log = (tmp_path / f"worker{index}.log").read_text()
        other = ids[1 - index]
        assert f"serving the body to {device_id}" in log
        assert f"serving the body to {other}" not in log
