"""A scripted device against the real server process: the body's answers equal PyTorch, and
malformed or out-of-place messages are refused with an ERROR naming the problem while the
server keeps running and averages only the valid update."""

from __future__ import annotations

import dataclasses
import queue
from pathlib import Path

import numpy as np
import pytest
import torch

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.export.split_vit import select_tail_input
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import Inbound, connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import RemoteError, RequestTimeout
from sfprompt.protocol.messages import Error, GradZ, Join, Presence, Smashed, Task, Update
from sfprompt.protocol.mqtt_client import MqttClient
from tests.bundles import eager_split
from tests.federation.harness import finish, start_server, stop_all, write_shards
from tests.helpers import wait_for

ID = "probe"


@pytest.mark.slow
def test_scripted_device_against_the_server(small_export, tmp_path: Path) -> None:
    write_shards(tmp_path / "data", devices=0, per_device=0)
    out = tmp_path / "server"
    with EmbeddedBroker(tmp_path / "broker") as broker:
        broker.start()
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "1", "--round-timeout", "60",
            "--test-data", str(tmp_path / "data" / "test.npz"),
            log=tmp_path / "server.log",
        )  # fmt: skip
        try:
            task, errors = run_probe(small_export, broker.url)
            assert finish(server, 60, tmp_path / "server.log") == 0
        finally:
            stop_all(server)
    codes = [e.code for e in errors]
    texts = " | ".join(e.text for e in errors)
    assert codes.count("bad_shape") == 1 and "tail." in texts
    assert codes.count("not_finite") == 1
    assert codes.count("rejected") >= 2 and "wrong_round" in texts
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt is not None and ckpt.round == 1
    record = ckpt.history[0]
    assert record["accepted"] == [ID] and 0.0 <= record["accuracy"] <= 1.0
    for key, value in task.params.items():  # one accepted update, eta_g = 1: it is the average
        np.testing.assert_allclose(ckpt.params[key], value + 0.01, rtol=1e-6, atol=1e-7)


def run_probe(export, url: str) -> tuple[Task, list[Error]]:
    manifest = export.device
    client = MqttClient(connection_config(url, ID, expect=expectations_for(manifest)))
    topics = client.config.topics
    tasks: queue.Queue[Task] = queue.Queue()
    errors: list[Error] = []

    def inbox(inbound: Inbound) -> None:
        if isinstance(inbound.message, Task):
            tasks.put(inbound.message)
        elif isinstance(inbound.message, Error):
            errors.append(inbound.message)

    client.subscribe(topics.device_inbox(ID), inbox)
    client.connect()
    try:
        foreign = dataclasses.replace(manifest, frozen_sha256="0" * 64)  # other frozen weights
        with pytest.raises(RemoteError, match="bundle_mismatch"):
            join(client, foreign)
        join(client, manifest)
        task = tasks.get(timeout=60)
        check_body_matches_pytorch(client, export, task)
        send_bad_updates_then_a_good_one(client, task, errors)
        return task, errors
    finally:
        client.close()


def join(client: MqttClient, manifest) -> None:
    topics = client.config.topics
    online = Presence(device_id=ID, online=True)  # as a device does: a JOIN alone is not online
    client.publish(topics.presence(ID), online, retain=True)
    message = Join(device_id=ID, bundle_hash=manifest.contract_hash(), runtime={}, hardware={})
    for _ in range(60):
        try:
            client.request(topics.up(ID, "join"), message, topics.down(ID, "status"), 2.0)
            return
        except RequestTimeout:
            continue  # the server is still starting
    raise AssertionError("the server never answered the join")


def check_body_matches_pytorch(client: MqttClient, export, task: Task) -> None:
    topics = client.config.topics
    manifest = export.device
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, manifest.tokens, manifest.embed_dim), dtype=np.float32)
    smashed = Smashed(device_id=ID, round=task.round, step=1, h=h)
    z = client.request(topics.up(ID, "smashed"), smashed, topics.down(ID, "body_out"), 30).z
    grad_z = rng.standard_normal(z.shape, dtype=np.float32)
    msg = GradZ(device_id=ID, round=task.round, step=1, grad_z=grad_z)
    grad_h = client.request(topics.up(ID, "grad_z"), msg, topics.down(ID, "grad_h"), 30).grad_h

    split, _ = eager_split(export)
    h_t = torch.from_numpy(h).requires_grad_(True)
    z_t = select_tail_input(split.body(h_t), split.tail_input, split.skip_tokens)
    (grad_t,) = torch.autograd.grad(z_t, h_t, torch.from_numpy(grad_z))
    assert rel_err(z, z_t.detach().numpy()) <= 1e-4
    assert rel_err(grad_h, grad_t.numpy()) <= 1e-4

    again = GradZ(device_id=ID, round=task.round, step=1, grad_z=grad_z)  # step already served
    with pytest.raises(RemoteError, match="unknown_step"):
        client.request(topics.up(ID, "grad_z"), again, topics.down(ID, "grad_h"), 30)
    wrong = Smashed(device_id=ID, round=task.round, step=2, h=h[:, 1:])
    with pytest.raises(RemoteError, match="bad_shape"):
        client.request(topics.up(ID, "smashed"), wrong, topics.down(ID, "body_out"), 30)


def send_bad_updates_then_a_good_one(client: MqttClient, task: Task, errors: list) -> None:
    topic = client.config.topics.up(ID, "update")
    params = {k: v.copy() for k, v in task.params.items()}
    key = next(k for k in params if k.startswith("tail."))
    bad_shape = {**params, key: np.zeros(params[key].shape[:-1] + (3,), np.float32)}
    nan = {**params, key: np.full_like(params[key], np.nan)}
    good = {k: v + np.float32(0.01) for k, v in params.items()}
    for body, round_ in ((bad_shape, task.round), (nan, task.round), (good, task.round + 7)):
        client.publish(topic, Update(device_id=ID, round=round_, params=body, samples=10))
    wait_for(lambda: len(errors) >= 3, what="an ERROR for each bad update")
    client.publish(topic, Update(device_id=ID, round=task.round, params=good, samples=10))
    client.publish(topic, Update(device_id=ID, round=task.round, params=good, samples=10))
    wait_for(lambda: len(errors) >= 4, what="an ERROR for the repeated update")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))
