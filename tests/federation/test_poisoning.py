"""Poisoning is not fatal: a real server, three honest device processes and real attackers (the
real device code with its training replaced by a poisoned UPDATE claiming 10^9 samples).

One attacker sends 1e30 everywhere: refused as too large, excluded after three refusals. The
other shifts every value by a finite amount under the norm bound: accepted, but trimmed away
by the coordinate-wise trimmed mean. The federation ends with the accuracy of the same run
without attackers, a finite checkpoint, and every honest update accepted in every round.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.cloud_server.fedavg import delta_norm
from sfprompt.protocol.broker import EmbeddedBroker
from tests.federation.harness import (
    NO_TORCH,
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)
from tests.helpers import wait_for

HONEST = ("dev-0", "dev-1", "dev-2")
ROUNDS = 6
# The attacker: the real device (join, presence, reconnects), but each round it answers the
# TASK at once with poisoned parameters, 10^9 samples and 10^9 claimed local samples.
POISONER = NO_TORCH + (
    "import os, sys, time\n"
    "import numpy as np\n"
    "from sfprompt.edge_client import device\n"
    "from sfprompt.protocol.messages import Update\n"
    "MODE, VALUE = sys.argv.pop(1).split(':')\n"
    "def poisoned_round(self, client, task):\n"
    "    value = np.float32(VALUE)\n"
    "    if MODE == 'fill':\n"
    "        params = {k: np.full_like(v, value) for k, v in task.params.items()}\n"
    "    else:\n"
    "        params = {k: (v + value).astype(np.float32) for k, v in task.params.items()}\n"
    "    update = Update(device_id=self.cfg.device_id, round=task.round, params=params,\n"
    "                    samples=10**9, metrics={'local_samples': 1e9})\n"
    "    topic = client.config.topics.up(self.cfg.device_id, 'update')\n"
    "    client.publish_packets(topic, client.packets(update))\n"
    "    return update\n"
    "device.EdgeDevice.run_round = poisoned_round\n"
    "join = device.EdgeDevice.join\n"
    "def gated_join(self, client):  # started early, joins when the test opens the gate\n"
    "    while not os.path.exists(os.environ['POISON_GATE']):\n"
    "        time.sleep(0.05)\n"
    "    join(self, client)\n"
    "device.EdgeDevice.join = gated_join\n"
    "from sfprompt.edge_client.cli import main\n"
    "sys.argv = ['sfprompt-edge', 'start', *sys.argv[1:]]\n"
    "main()\n"
)
ATTACKERS = {"evil-fill": "fill:1e30", "evil-shift": "shift:2.0"}
ROBUST = ("--aggregation", "trimmed-mean")


def start_poisoner(
    mode: str, bundle, broker_url: str, shard: Path, device_id: str, log: Path, gate: Path
):
    """The real `sfprompt-edge start` with `run_round` replaced by a poisoned UPDATE; it joins
    once `gate` exists."""
    args = [
        "-v", "--bundle", str(bundle.device_dir), "--data", str(shard), "--broker", broker_url,
        "--device-id", device_id, "--leave-when-server-stops",
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", POISONER, mode, *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "POISON_GATE": str(gate)},
    )


def run_federation(
    bundle, tmp_path: Path, name: str, attackers: dict[str, str], *server_args: str
) -> tuple[list[dict], Path]:
    """Server + 3 honest devices (+ attackers) to the end; returns (metrics, server out)."""
    root = tmp_path / name
    # 1,000 test images (of 1,797): two nearby models then differ by few points, not by noise
    shards = write_shards(root / "data", len(HONEST) + len(attackers), per_device=48, test=1000)
    out = root / "server"
    procs = []
    with EmbeddedBroker(root / "broker") as broker:
        try:
            server = start_server(
                "--bundle", str(bundle.server_dir), "--broker", broker.url, "--out", str(out),
                "--test-data", str(root / "data" / "test.npz"), "--rounds", str(ROUNDS),
                "--min-devices", str(len(HONEST)), "--round-timeout", "60", "--seed", "3",
                "--batch-size", "16", "--keep-ratio", "0.5", "--local-epochs", "5",
                "--local-lr", "0.1", "--split-lr", "0.05", "--max-refusals", "2", *server_args,
                log=root / "server.log",
            )  # fmt: skip
            procs.append(server)
            for i, device_id in enumerate(HONEST):
                procs.append(
                    start_fleet_device(
                        bundle,
                        broker.url,
                        shards[i],
                        device_id,
                        root / f"{device_id}.log",
                        "--leave-when-server-stops",
                    )  # fmt: skip
                )
            gate = root / "attack"
            for j, (device_id, mode) in enumerate(attackers.items()):
                shard = shards[len(HONEST) + j]
                log = root / f"{device_id}.log"
                procs.append(start_poisoner(mode, bundle, broker.url, shard, device_id, log, gate))
            joined = lambda: all(  # noqa: E731
                "joined the federation" in (root / f"{d}.log").read_text() for d in HONEST
            )
            wait_for(joined, 120, "the honest devices to join")  # round 1 starts with them
            gate.touch()  # the attackers join during round 1 and attack from round 2 on
            assert finish(server, 240, root / "server.log") == 0
            for device_id, proc in zip(HONEST, procs[1 : 1 + len(HONEST)]):
                assert finish(proc, 60, root / f"{device_id}.log") == 0  # left when told
        finally:
            stop_all(*procs)
    return metrics_lines(out / "metrics.jsonl"), out


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_poisoned_updates_do_not_stop_the_federation(small_export, tmp_path: Path) -> None:
    clean, clean_out = run_federation(small_export, tmp_path, "clean", {}, *ROBUST)
    attacked, out = run_federation(small_export, tmp_path, "attacked", ATTACKERS, *ROBUST)
    assert [r["round"] for r in attacked] == list(range(1, ROUNDS + 1))
    assert attacked[0]["selected"] == list(HONEST)  # the attackers joined during round 1
    for record in attacked:  # the honest devices trained and were averaged in every round
        assert set(HONEST) <= set(record["accepted"]), record
        assert np.isfinite(record["loss"]) and not record["model_refused"]
    # 1e30 everywhere: refused as too large twice (--max-refusals 2), then never selected again
    refused = [r["round"] for r in attacked if ["evil-fill", "too_large"] in r["rejected"]]
    assert len(refused) == 2, [r["rejected"] for r in attacked]
    assert all("evil-fill" in r["excluded"] for r in attacked if r["round"] >= refused[-1])
    after = [r for r in attacked if r["round"] > refused[-1]]
    assert after and all("evil-fill" not in r["selected"] for r in after)
    # An in-bound shift with 10^9 samples: accepted, its weight capped, trimmed away
    shifted = [r for r in attacked if "evil-shift" in r["accepted"]]
    assert len(shifted) >= 3, "the in-bound attacker was hardly averaged in: nothing proved"
    push = shifted[0]["devices"]["evil-shift"]["update_norm"]
    for record in shifted:
        assert record["devices"]["evil-shift"]["weight"] == 10_000  # 10^9 claimed
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    clean_ckpt = load_checkpoint(clean_out / "checkpoint.safetensors")
    assert ckpt is not None and clean_ckpt is not None and ckpt.round == ROUNDS
    assert all(np.isfinite(v).all() for v in ckpt.params.values())
    drift = delta_norm(clean_ckpt.params, ckpt.params)
    assert drift < 0.05 * push, (drift, push)  # fedavg: ~push per round
    assert abs(attacked[-1]["accuracy"] - clean[-1]["accuracy"]) <= 0.02, (
        [r["accuracy"] for r in clean],
        [r["accuracy"] for r in attacked],
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_with_every_bound_off_the_server_keeps_its_last_good_model(
    small_export, tmp_path: Path
) -> None:
    """The last line of defence: with no norm bound, 1e30 with 10^9 samples is averaged in by
    FedAvg, and the new model (norm ~1e30) is refused: the last good one is kept, saved and
    sent, and the honest device trains on it (today the model became 1e30 and every later
    round failed)."""
    shards = write_shards(tmp_path / "data", 2, per_device=32)
    out = tmp_path / "server"
    gate = tmp_path / "attack"
    gate.touch()
    with EmbeddedBroker(tmp_path / "broker") as broker:
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "2", "--min-devices", "2", "--round-timeout", "60",
            "--batch-size", "16", "--max-update-norm", "inf", log=tmp_path / "server.log",
        )  # fmt: skip
        honest = start_fleet_device(
            small_export, broker.url, shards[0], "dev-0", tmp_path / "dev-0.log",
            "--leave-when-server-stops",
        )  # fmt: skip
        evil = start_poisoner(
            "fill:1e30", small_export, broker.url, shards[1], "evil", tmp_path / "evil.log", gate
        )
        try:
            assert finish(server, 180, tmp_path / "server.log") == 0
            assert finish(honest, 60, tmp_path / "dev-0.log") == 0
        finally:
            stop_all(server, honest, evil)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["accepted"] == ["dev-0", "evil"], record  # no bound: both averaged
        assert "norm grew" in record["model_refused"], record
        assert record["params_after"] == record["params_before"]
    assert "failed" not in (tmp_path / "dev-0.log").read_text()
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    initial = load_file(str(small_export.server_dir / "prompt_tail.safetensors"))
    assert ckpt is not None and ckpt.round == 2
    for key, value in initial.items():
        np.testing.assert_array_equal(ckpt.params[key], value)
