"""`serve --capture DIR` in a real federation: the server process writes the split traffic it
accepted and the round's params, within its limit, and `sfprompt-audit` reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfprompt.cloud_server.traffic_capture import read_round, read_step
from sfprompt.sim.audit_cli import main as audit
from tests.federation.harness import (
    finish,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)


@pytest.mark.slow
def test_serve_captures_one_round_of_split_traffic(small_export, broker, tmp_path: Path) -> None:  # noqa: ANN001
    """One device, one round, 16 samples kept in batches of 8, each sent in exchanges of 4 (the
    device's micro-batch; int8 up), --capture-limit 2: the round's params and the first
    exchange's h and dL/dz, of the manifest's shapes; the next is over the limit, which the
    log says once."""
    (shard,) = write_shards(tmp_path / "data", devices=1, per_device=32, test=40)
    capture = tmp_path / "capture"
    server = start_server(
        "--bundle", str(small_export.server_dir), "--broker", broker.url,
        "--out", str(tmp_path / "server"), "--rounds", "1", "--min-devices", "1",
        "--round-timeout", "120", "--batch-size", "8", "--keep-ratio", "0.5",
        "--prune", "global", "--local-epochs", "1", "--encoding", "int8",
        "--capture", str(capture), "--capture-limit", "2",
        log=tmp_path / "server.log",
    )  # fmt: skip
    device = start_fleet_device(
        small_export, broker.url, shard, "dev-0", tmp_path / "dev.log", "--leave-when-server-stops"
    )
    try:
        assert finish(server, 120, tmp_path / "server.log") == 0
        assert finish(device, 60, tmp_path / "dev.log") == 0
    finally:
        stop_all(server, device)
    manifest = small_export.server
    names = sorted(p.name for p in capture.iterdir())
    assert names == ["round-1-params.safetensors", "step-dev-0-r1-s1.safetensors"]
    step = read_step(capture / names[1])
    assert step.h.shape == (4, manifest.tokens, manifest.embed_dim)
    assert step.grad_z is not None and step.grad_z.shape == (4, 1, manifest.embed_dim)
    assert step.encoding == step.grad_encoding == "int8"
    round_one = read_round(capture / names[0])
    assert set(round_one.params) == set(manifest.parameters)
    assert round_one.contract_hash == manifest.contract_hash()
    log = (tmp_path / "server.log").read_text()
    assert log.count("capture limit reached") == 1

    out = tmp_path / "audit"
    result = CliRunner().invoke(
        audit,
        [str(capture), "--bundle", str(small_export.server_dir), "--images", str(shard),
         "--out", str(out), "--steps", "5", "--max-images", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    assert len(report["samples"]) == 4 and report["scores"]["label_accuracy"] is not None
