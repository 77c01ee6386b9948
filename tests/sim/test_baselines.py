"""The in-process baselines: FedAvg of fl_full is the hand-computed weighted mean, bytes are the
exact sizes (safetensors for weights, the codec for SFL's messages), two rounds lower the
training loss for every method, runs repeat under the seed, and the features are the model's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save as safetensors_save

from sfprompt.export.cut_manifest import preprocess_config
from sfprompt.export.split_vit import Cut
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import BodyOut, GradH, GradZ, Smashed
from sfprompt.sim.baselines import (
    BASELINES,
    BaselineConfig,
    FlRun,
    evaluate,
    to_tensors,
    untuned_features,
)
from sfprompt.sim.costs import round_minutes
from sfprompt.sim.device_memory import ModelSpec
from sfprompt.sim.run_baseline import run_baseline
from sfprompt.sim.sfl import SflRun

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
CLASSES = 4
CUT = Cut(1, 0, 2)
PATCHES = (32 // 8) ** 2


# The same 'pre-trained' tiny ViT every call (a fixed random initialisation).
build = ModelSpec("vit_tiny_patch16_224", CLASSES, model_args=dict(TINY), seed=0)


# crop_pct 1.0, as the simulator's bundles say (sim/pipeline.py `framed`): its images are
# already at the model's size, so the eval transform leaves them as they are.
PREPROCESS = {**preprocess_config(build()), "crop_pct": 1.0}


def digits_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 noise with a bright square whose colour says the class (class 3:
    grey), at a random place: a task a linear patch embedding can pick up in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
    for image, label in zip(images, labels):
        top, left = rng.integers(0, 16, 2)
        channels = [int(label)] if label < 3 else [0, 1, 2]
        image[top : top + 16, left : left + 16, channels] += 160
    return images, labels


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is as fast and does not suffer from a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fl_full_fedavg_equals_hand_computation() -> None:
    cfg = BaselineConfig(lr=0.05, batch_size=16, server_lr=0.5)  # one batch per shard
    (xa, ya), (xb, yb) = (to_tensors(PREPROCESS, *digits_like(n, n), "s") for n in (6, 10))
    run = FlRun("fl_full", build(), CUT, cfg)
    start = run.params
    rng = np.random.default_rng(0)
    clients = []
    for x, y in ((xa, ya), (xb, yb)):
        run.load(start)
        run.local_train(x, y, rng)
        clients.append(run.state())
    run.load(start)
    run.round(1, {0: (xa, ya), 1: (xb, yb)}, rng)
    a, b = clients
    moved = 0
    for key, old in start.items():
        # new = old + eta_g * (6/16 (a - old) + 10/16 (b - old))
        expected = old + 0.5 * (6 / 16 * (a[key] - old) + 10 / 16 * (b[key] - old))
        np.testing.assert_allclose(run.params[key], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(run.state()[key], run.params[key])  # the model holds it
        moved += int(not np.allclose(a[key], old))
    assert moved > len(start) // 2  # every weight trains in fl_full


def test_fl_full_with_lr_zero_keeps_the_weights_exactly() -> None:
    run = FlRun("fl_full", build(), CUT, BaselineConfig(lr=0.0, batch_size=4))
    start = run.params
    shards = {i: to_tensors(PREPROCESS, *digits_like(n, i), "s") for i, n in enumerate((5, 9))}
    run.round(1, shards, np.random.default_rng(0))
    for key, old in start.items():
        np.testing.assert_array_equal(run.params[key], old)


@pytest.mark.slow
def test_fl_bytes_are_the_safetensors_size_of_what_is_averaged() -> None:
    state = {k: v.numpy() for k, v in build().state_dict().items()}
    size = len(safetensors_save(state))
    shards = [digits_like(12, 1), digits_like(20, 2)]
    cfg = BaselineConfig(rounds=1, batch_size=8)
    result, _ = run_baseline("fl_full", build, PREPROCESS, shards, digits_like(8, 3), cfg, CUT)
    (record,) = result.rounds
    assert record.bytes_up + record.bytes_down == 2 * size
    assert record.measured == {"memory": True, "bytes": False, "flops": True}
    assert record.est_round_minutes == pytest.approx(
        round_minutes(record.device_flops, 0.0, record.bytes_up, record.bytes_down, cfg)
    )
    prompt_result, _ = run_baseline(
        "fl_prompt", build, PREPROCESS, shards, digits_like(8, 3), cfg, CUT
    )
    # prompt (P, D) + final norm (2 D) + classifier (D C + C), with their safetensors headers
    vit = build()
    tail = {f"tail.{n}": p.detach().numpy() for n, p in vit.named_parameters()}
    tail = {k: v for k, v in tail.items() if k.startswith(("tail.norm.", "tail.head."))}
    expected = len(safetensors_save({"prompt.tokens": np.zeros((2, 48), np.float32), **tail}))
    assert prompt_result.rounds[0].bytes_up == expected
    assert prompt_result.rounds[0].device_flops < record.device_flops  # frozen weights: no dW


@pytest.mark.slow
def test_fl_flops_scale_with_the_work() -> None:
    shards = [digits_like(16, 1)]
    one, _ = run_baseline(
        "fl_full", build, PREPROCESS, shards, digits_like(8, 3), BaselineConfig(rounds=1), CUT
    )
    cfg = BaselineConfig(rounds=1, local_epochs=2, batch_size=8)
    two, _ = run_baseline("fl_full", build, PREPROCESS, shards, digits_like(8, 3), cfg, CUT)
    assert two.rounds[0].device_flops == pytest.approx(2 * one.rounds[0].device_flops)


@pytest.mark.slow
def test_sfl_bytes_per_batch_equal_the_codec_sizes() -> None:
    shards = [digits_like(20, 1)]  # batches of 16 and 4
    cfg = BaselineConfig(rounds=1, batch_size=16)
    result, features = run_baseline("sfl", build, PREPROCESS, shards, digits_like(8, 3), cfg, CUT)
    assert features is None
    # The device holds every weight but block 1 (the body of a 2-block model cut after block 0).
    device = {n: p.detach().numpy() for n, p in build().named_parameters()}
    weights = len(safetensors_save({n: v for n, v in device.items() if "blocks.1." not in n}))
    up = down = weights
    for step, batch in enumerate((16, 4)):
        h = np.zeros((batch, 1 + PATCHES, 48), np.float32)  # no prompts in SFL
        z = np.zeros((batch, 1, 48), np.float32)  # the class token is all the tail reads
        envelope = {"device_id": "dev-0", "round": 1, "step": step}
        up += len(encode(Smashed(h=h, **envelope))) + len(encode(GradZ(grad_z=z, **envelope)))
        down += len(encode(BodyOut(z=z, **envelope))) + len(encode(GradH(grad_h=h, **envelope)))
    (record,) = result.rounds
    assert (record.bytes_up, record.bytes_down) == (up, down)
    assert record.measured["bytes"] is True


def test_sfl_trains_the_body_on_the_server() -> None:
    run = SflRun(build(), CUT, BaselineConfig(lr=0.05, batch_size=8))
    body = [p.detach().clone() for p in run.server]
    assert not any(key.startswith("blocks.1.") for key in run.params)  # the body is not averaged
    x, y = to_tensors(PREPROCESS, *digits_like(16, 1), "s")
    run.probe(x[:8], y[:8])
    costs = run.round(1, {0: (x, y)}, np.random.default_rng(0))
    assert all(not torch.equal(a, b) for a, b in zip(body, run.server))
    assert costs[0].server_flops > 0 and costs[0].device_flops > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", BASELINES)
def test_two_rounds_lower_the_training_loss(method: str) -> None:
    train = digits_like(96, 7)
    shards = [(train[0][:40], train[1][:40]), (train[0][40:], train[1][40:])]
    cfg = BaselineConfig(rounds=2, lr=0.01, batch_size=16)
    x, y = to_tensors(PREPROCESS, *train, "train")
    before = FlRun(method, build(), CUT, cfg) if method == "fl_prompt" else None
    _, initial = evaluate(before.forward if before else build(), x, y)
    result, _ = run_baseline(method, build, PREPROCESS, shards, train, cfg, CUT)  # test = train
    losses = [r.loss for r in result.rounds]
    assert losses[1] < losses[0] < initial, (initial, losses)
    assert all(0.0 <= r.accuracy <= 1.0 and r.device_flops > 0 for r in result.rounds)


@pytest.mark.slow
def test_runs_repeat_under_the_seed_and_differ_across_seeds() -> None:
    shards = [digits_like(24, 1), digits_like(24, 2)]
    test = digits_like(16, 3)

    def losses(seed: int) -> list[float]:
        cfg = BaselineConfig(rounds=2, lr=0.05, batch_size=8, fraction=0.5, seed=seed)
        result, _ = run_baseline("fl_prompt", build, PREPROCESS, shards, test, cfg, CUT)
        return [r.loss for r in result.rounds]

    first = losses(0)
    assert losses(0) == first
    assert losses(1) != first


@pytest.mark.slow
def test_fl_full_features_are_what_the_tail_reads() -> None:
    test = digits_like(12, 3)
    untuned = untuned_features(build, PREPROCESS, test, CUT)
    assert untuned.name == "untuned" and untuned.features.shape == (12, 48)
    np.testing.assert_array_equal(untuned.labels, test[1])
    vit = build()
    x, _ = to_tensors(PREPROCESS, *test, "test")
    with torch.no_grad():  # the class token after the last block, before the final norm
        z = vit.blocks(vit._pos_embed(vit.patch_embed(x)))[:, 0]
    np.testing.assert_allclose(untuned.features, z.numpy(), rtol=1e-5, atol=1e-5)
    shards = [digits_like(16, 1)]
    cfg = BaselineConfig(rounds=1, lr=0.0)
    _, same = run_baseline("fl_full", build, PREPROCESS, shards, test, cfg, CUT)
    np.testing.assert_allclose(same.features, untuned.features, rtol=1e-5, atol=1e-6)
    cfg = BaselineConfig(rounds=1, lr=0.05)
    _, tuned = run_baseline("fl_full", build, PREPROCESS, shards, test, cfg, CUT)
    assert tuned.name == "fl_full" and not np.allclose(tuned.features, untuned.features)


def test_bad_arguments_are_refused() -> None:
    shards, test = [digits_like(8, 1)], digits_like(8, 2)
    with pytest.raises(ValueError, match="sfprompt"):
        run_baseline("sfprompt", build, PREPROCESS, shards, test, BaselineConfig())
    bad = (shards[0][0], np.full(8, CLASSES))
    with pytest.raises(ValueError, match="labels must lie in"):
        run_baseline("fl_full", build, PREPROCESS, [bad], test, BaselineConfig())
    empty = (shards[0][0][:0], shards[0][1][:0])
    with pytest.raises(ValueError, match="shard 1 is empty"):
        run_baseline("fl_full", build, PREPROCESS, [shards[0], empty], test, BaselineConfig())
    with pytest.raises(ValueError, match="fraction"):
        BaselineConfig(fraction=0.0)
    assert math.isclose(BaselineConfig().uplink_mbps, 12.0)
