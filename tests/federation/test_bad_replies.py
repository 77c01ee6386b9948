"""Outputs are checked on both sides: the server answers a step whose body output is not finite
with an ERROR (never NaN), and a device that gets a refused or bad reply fails that round only
and carries on with the next."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.body_service import BodyService
from sfprompt.cloud_server.checkpoint import Checkpoint, save_checkpoint
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.cloud_server.step_state import StepStore
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.bundle import PROMPT_KEY
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import RemoteError
from sfprompt.protocol.messages import Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from tests.federation.harness import (
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)


def test_an_extreme_but_finite_h_gets_an_error_not_nan(small_export, tmp_path: Path) -> None:
    model = ServerModel.from_bundle(small_export.server_dir, BodyConfig(device="cpu"))
    expect = expectations_for(model.manifest)
    with EmbeddedBroker(tmp_path / "broker") as broker:
        server = MqttClient(connection_config(broker.url, "server", expect=expect))
        with BodyBatcher(model, 64, 0.0) as batcher:
            BodyService(server, batcher, StepStore()).attach()
            server.connect()
            device = MqttClient(connection_config(broker.url, "dev-1", expect=expect))
            topics = device.config.topics
            device.subscribe(topics.device_inbox("dev-1"), lambda inbound: None)  # replies
            device.connect()
            try:
                shape = (2, model.manifest.tokens, model.manifest.embed_dim)
                h = np.full(shape, 3e19, np.float32)
                smashed = Smashed(device_id="dev-1", round=1, step=1, h=h)
                with pytest.raises(RemoteError, match="not_finite.*too large"):
                    device.request(
                        topics.up("dev-1", "smashed"), smashed, topics.down("dev-1", "body_out"), 30
                    )
            finally:
                device.close()
                server.close()


@pytest.mark.slow
def test_devices_fail_a_poisoned_round_and_carry_on(small_export, tmp_path: Path) -> None:
    """The server resumes from a global prompt at 1e25 (a poisoned model): the body's output
    overflows, every device's round fails, and no device exits; the rounds still end."""
    out = tmp_path / "server"
    out.mkdir()
    params = load_file(str(small_export.server_dir / "prompt_tail.safetensors"))
    params[PROMPT_KEY] = np.full_like(params[PROMPT_KEY], 1e25)
    contract = small_export.server.contract_hash()
    rng_state = np.random.default_rng(0).bit_generator.state
    save_checkpoint(out / "checkpoint.safetensors", Checkpoint(1, params, [], rng_state, contract))
    shards = write_shards(tmp_path / "data", devices=2, per_device=16)
    with EmbeddedBroker(tmp_path / "broker") as broker:
        fleet = [
            start_fleet_device(
                small_export,
                broker.url,
                shard,
                f"dev-{i}",
                tmp_path / f"dev-{i}.log",
                "--request-timeout",
                "10",
                "--leave-when-server-stops",
            )  # fmt: skip
            for i, shard in enumerate(shards)
        ]
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "3", "--min-devices", "2", "--round-timeout", "30",
            "--batch-size", "8", log=tmp_path / "server.log",
        )  # fmt: skip
        try:
            assert finish(server, 180, tmp_path / "server.log") == 0
            for i, device in enumerate(fleet):
                assert finish(device, 60, tmp_path / f"dev-{i}.log") == 0  # left when told
        finally:
            stop_all(server, *fleet)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [2, 3]
    for i in range(2):
        log = (tmp_path / f"dev-{i}.log").read_text()
        assert "round 2 failed, waiting for the next" in log, log[-2000:]
        assert "round 3" in log
    server_log = (tmp_path / "server.log").read_text()
    assert "not finite" in server_log or "not_finite" in server_log
