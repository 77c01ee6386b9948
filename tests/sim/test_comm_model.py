"""The communication model counts what the real federation counts: message lengths from the
protocol's encoder, chunks as the MQTT client cuts them, and, end to end, the bytes a real
federation records in metrics.jsonl."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from sfprompt.protocol.bundle import Manifest, TailInput, TensorSpec
from sfprompt.protocol.client_config import ClientConfig, Inbound
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import (
    ENCODINGS,
    BodyOut,
    GradH,
    GradZ,
    Message,
    PhaseSettings,
    Smashed,
    Task,
    Update,
)
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.sim.comm_model import (
    UPDATE_MEMORY,
    UPDATE_METRICS,
    CommModel,
    RoundBytes,
    batch_sizes,
    kept_samples,
    typical_settings,
)
from sfprompt.sim.wire_sizes import Link, Stamp, WireSizes

DIM, PATCHES, PROMPTS = 24, 16, 4


def small_manifest(tail_kind: str = "prefix_tokens") -> Manifest:
    """The shapes of a small cut model, written by hand: no export needed."""
    tokens = 1 + PROMPTS + PATCHES
    count = tokens if tail_kind == "all_tokens" else 1
    return Manifest(
        role="device",
        protocol_version=1,
        model="test",
        model_args={},
        num_classes=5,
        prompts=PROMPTS,
        head_blocks=1,
        tail_blocks=1 if tail_kind == "all_tokens" else 0,
        depth=4,
        embed_dim=DIM,
        num_prefix_tokens=1,
        num_patches=PATCHES,
        export_batch=8,
        opset=17,
        tail_input=TailInput(tail_kind, count, ("batch", count, DIM)),
        parameters={
            "prompt.tokens": TensorSpec("prompt.tokens", "float32", (PROMPTS, DIM)),
            "tail.head.weight": TensorSpec("tail.head.weight", "float32", (5, DIM)),
            "tail.head.bias": TensorSpec("tail.head.bias", "float32", (5,)),
        },
    )


def sent_bytes(message: Message, max_chunk_bytes: int = 8 << 20) -> int:
    """What a sending MqttClient counts for `message`: the lengths of its packets."""
    client = MqttClient(ClientConfig("counter", max_chunk_bytes=max_chunk_bytes))
    return sum(len(p) for p in client.packets(message))


STAMPS = [
    Stamp("d", 0, 0),
    Stamp("device-000", 1, 9),
    Stamp("device-000", 1, 10),
    Stamp("cam-07.lab", 12, 99),
    Stamp("x" * 64, 123456, 100000),
]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_smashed_bytes_of_one_batch_equal_the_encoded_message(encoding: str) -> None:
    """One SMASHED is as long as the codec's encoding of it, whatever the envelope's digits
    (its header is padded to 8 bytes, so one more digit may add 0 or 8 bytes)."""
    wire = WireSizes()
    rng = np.random.default_rng(0)
    for batch in (1, 7, 128):
        for stamp in STAMPS:
            h = rng.standard_normal((batch, 21, DIM)).astype(np.float32)
            msg = Smashed(
                device_id=stamp.device_id,
                round=stamp.round,
                step=stamp.step,
                h=h,
                encoding=encoding,
            )
            assert wire.activation(Smashed, h.shape, encoding, stamp) == len(encode(msg))


@pytest.mark.parametrize("encoding", ["fp32", "int8"])
def test_chunked_messages_count_every_chunk_as_the_client_sends_them(encoding: str) -> None:
    """Over the packet limit, a message's bytes are its chunk messages', as MqttClient cuts it."""
    limit = 1600
    wire = WireSizes(Link(max_chunk_bytes=limit))
    for cls, field, shape in ((Smashed, "h", (9, 21, DIM)), (GradH, "grad_h", (3, 21, DIM))):
        for stamp in STAMPS:
            msg = cls(
                device_id=stamp.device_id,
                round=stamp.round,
                step=stamp.step,
                encoding=encoding,
                **{field: np.ones(shape, np.float32)},
            )
            expected = sent_bytes(msg, limit)
            assert expected > len(encode(msg))  # chunked: every chunk has its own header
            assert wire.activation(cls, shape, encoding, stamp) == expected


def test_the_broker_limit_is_the_clients_less_its_reserve() -> None:
    assert Link(max_chunk_bytes=1 << 20, broker_max_packet=20_000).limit == 20_000 - 4096
    assert Link(max_chunk_bytes=10_000, broker_max_packet=1 << 20).limit == 10_000
    assert Link().limit == 8 << 20


def test_task_and_update_are_the_messages_the_server_counts() -> None:
    model = CommModel(small_manifest())
    settings = typical_settings(0.5, 16, "fp16")
    params = {k: np.ones(v.shape, np.float32) for k, v in model.params().items()}
    task = Task(device_id="dev-3", round=7, params=params, settings=settings)
    assert model.task(settings, "dev-3", 7) == sent_bytes(task)
    metrics, memory = {"kept": 3.0, "local_loss": 0.25}, {"peak_rss_mb": 99.5}
    update = Update(
        device_id="dev-3", round=7, params=params, samples=3, metrics=metrics, memory=memory
    )
    assert model.update(3, metrics, memory, "dev-3", 7) == len(encode(update))


def test_a_round_keeps_ceil_gamma_n_samples_in_batches_with_a_partial_last_one() -> None:
    assert kept_samples(37, 0.5) == 19 and kept_samples(1, 0.1) == 1 and kept_samples(5, 1.0) == 5
    assert kept_samples(37, 0.5, [9, 9, 9, 10]) == 20  # per class: 5 + 5 + 5 + 5
    assert batch_sizes(19, 8) == [8, 8, 3] and batch_sizes(16, 8) == [8, 8]
    settings = typical_settings(0.5, 8, "fp32")
    # a device keeping a tape sends each batch in exchanges of its micro-batch (4); with
    # --lean or TorchScript, a batch per exchange
    for exchange_batch, exchanges in ((4, [4, 4, 4, 4, 3]), (None, [8, 8, 3])):
        model = CommModel(small_manifest(), exchange_batch=exchange_batch)
        rb = model.sfprompt_round(37, settings, "dev-0", 1)
        up = down = 0
        for step, batch in enumerate(exchanges, start=1):
            stamp = dict(device_id="dev-0", round=1, step=step)
            h, z = np.zeros((batch, 21, DIM), np.float32), np.zeros((batch, 1, DIM), np.float32)
            up += len(encode(Smashed(h=h, **stamp))) + len(encode(GradZ(grad_z=z, **stamp)))
            down += len(encode(BodyOut(z=z, **stamp))) + len(encode(GradH(grad_h=h, **stamp)))
        assert (rb.up_split, rb.down_split) == (up, down), exchange_batch
        assert rb.up == rb.up_split + rb.up_model and rb.total == rb.up + rb.down


def data_bytes(payload: bytes) -> int:
    """The tensor bytes of a safetensors payload: all but its length prefix and JSON header."""
    return len(payload) - 8 - int.from_bytes(payload[:8], "little")


def test_each_direction_counts_in_its_own_encoding() -> None:
    """fp32 up, int8 down, one batch of 3 on the small shapes (h 21 x 24 per sample, z 1 x 24),
    checked against the real messages and their tensor bytes worked out by hand."""
    model = CommModel(small_manifest())
    stamp = Stamp("dev-0", 1, 1)
    up, down = model.split_batch(3, "fp32", stamp, encoding_down="int8")
    assert up == model.split_batch(3, "fp32", stamp)[0]  # up as in plain fp32
    assert down == model.split_batch(3, "int8", stamp)[1]  # down as in plain int8
    env = dict(device_id="dev-0", round=1, step=1)
    h, z = np.zeros((3, 21, DIM), np.float32), np.zeros((3, 1, DIM), np.float32)
    ups = [encode(Smashed(h=h, **env)), encode(GradZ(grad_z=z, **env))]
    downs = [
        encode(BodyOut(z=z, encoding="int8", **env)),
        encode(GradH(grad_h=h, encoding="int8", **env)),
    ]
    assert (up, down) == (sum(map(len, ups)), sum(map(len, downs)))
    # by hand: fp32 is 4 bytes a value; int8 one byte a value plus a float32 scale per row
    assert [data_bytes(p) for p in ups] == [3 * 21 * DIM * 4, 3 * 1 * DIM * 4]  # 6048, 288
    assert [data_bytes(p) for p in downs] == [3 * DIM + 3 * 4, 3 * 21 * DIM + 3 * 21 * 4]
    # a round: the split counters follow each direction's encoding, the rest is unchanged
    settings = typical_settings(0.5, 8, "fp32")
    mixed = model.sfprompt_round(37, settings, encoding_down="int8")
    fp32 = model.sfprompt_round(37, settings)
    int8 = model.sfprompt_round(37, typical_settings(0.5, 8, "int8"))
    assert (mixed.up_split, mixed.down_split) == (fp32.up_split, int8.down_split)
    assert mixed.down_model == fp32.down_model  # the TASK says fp32 either way
    sfl = model.sfl_round(21, 8, "fp32", 1000, encoding_down="int8")
    assert sfl.down_split == model.sfl_round(21, 8, "int8", 1000).down_split


def test_sfl_split_bytes_are_the_simulators_own_count() -> None:
    """SFL's activations (no prompt tokens) per batch, summed, equal `sim.sfl.split_batch_bytes`
    on the same tensors (which numbers steps from 0 and never chunks)."""
    from sfprompt.sim.sfl import split_batch_bytes

    for kind in ("prefix_tokens", "all_tokens"):
        model = CommModel(small_manifest(kind), Link(max_chunk_bytes=1 << 30))
        up = down = 0
        for step, batch in enumerate(batch_sizes(21, 8)):
            h = np.zeros((batch, 1 + PATCHES, DIM), np.float32)
            z = h if kind == "all_tokens" else h[:, :1]
            u, d = split_batch_bytes("dev-1", 2, step, h, z, z, h)
            up, down = up + u, down + d
        got = model.split(21, 8, "fp32", "dev-1", 2, first_step=0, shapes=model.sfl_shapes)
        assert got == (up, down)
        sfl = model.sfl_round(21, 8, "fp32", 1000, device_id="dev-1", round=2)
        assert sfl.up_model == sfl.down_model == 1000 and sfl.up_split > 0


# ---- a real federation ----------------------------------------------------------------------


def update_maps(record: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The UPDATE's metrics and memory maps, back from what the server recorded of it."""
    server_side = {"samples", "bytes_up_update", "bytes_down_task"}
    server_side |= {"update_norm", "weight", "clipped"}  # what aggregation measured of it
    metrics = {k: v for k, v in record.items() if k in UPDATE_METRICS}
    memory = {k: v for k, v in record.items() if k not in server_side and k not in metrics}
    return metrics, memory


def write_uneven_shards(directory: Path, sizes: list[int]) -> list[Path]:
    """Disjoint digit shards of the given sizes, and a small test.npz."""
    from tests.federation.harness import digits_images

    images, labels = digits_images()
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "test.npz", images=images[-50:], labels=labels[-50:])
    paths, start = [], 0
    for i, size in enumerate(sizes):
        path = directory / f"device{i}.npz"
        np.savez(path, images=images[start : start + size], labels=labels[start : start + size])
        paths.append(path)
        start += size
    return paths


class TaskObserver:
    """A client of the test's broker that keeps every TASK the server sends: the model needs
    its settings (the deadline's text sets the TASK's length to the byte)."""

    def __init__(self, port: int) -> None:
        self.tasks: dict[tuple[str, int], PhaseSettings] = {}
        self._lock = threading.Lock()
        self.client = MqttClient(ClientConfig("task-observer", port=port))
        root = self.client.config.topics.root
        self.client.subscribe(f"{root}/dev/+/down/task", self._keep)
        self.client.connect()

    def _keep(self, inbound: Inbound) -> None:
        task = inbound.message
        assert isinstance(task, Task)
        with self._lock:
            self.tasks[(task.device_id, task.round)] = task.settings


@pytest.mark.slow
def test_model_equals_the_bytes_a_real_federation_measures(small_export, tmp_path: Path) -> None:
    """Two devices of different sizes, gamma 0.5, batch 8 (partial last batches), int8
    activations up and fp16 down (--encoding-down), and a broker whose packet limit chunks every
    SMASHED and GRAD_H: per device, each of the four byte counters in metrics.jsonl equals the
    model's, to the byte."""
    from sfprompt.protocol.broker import EmbeddedBroker
    from tests.federation.harness import (
        finish,
        metrics_lines,
        start_fleet_device,
        start_server,
        stop_all,
    )

    broker_max_packet = 4096 + 12_000
    shards = write_uneven_shards(tmp_path / "data", [37, 22])
    out = tmp_path / "server"
    with EmbeddedBroker(tmp_path / "broker", max_packet_size=broker_max_packet) as broker:
        broker.start()
        observer = TaskObserver(broker.port)
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--test-data", str(tmp_path / "data" / "test.npz"), "--rounds", "1",
            "--min-devices", "2", "--round-timeout", "120", "--batch-size", "8",
            "--keep-ratio", "0.5", "--local-epochs", "1", "--encoding", "int8",
            "--encoding-down", "fp16", log=tmp_path / "server.log",
        )  # fmt: skip
        devices = [
            start_fleet_device(
                small_export,
                broker.url,
                shard,
                f"dev-{i}",
                tmp_path / f"dev-{i}.log",
                "--leave-when-server-stops",
            )  # fmt: skip
            for i, shard in enumerate(shards)
        ]
        try:
            assert finish(server, 120, tmp_path / "server.log") == 0
        finally:
            stop_all(server, *devices)
            observer.client.close(send_will=False)
    (record,) = metrics_lines(out / "metrics.jsonl")
    assert record["accepted"] == ["dev-0", "dev-1"]
    model = CommModel(small_export.device, Link(broker_max_packet=broker_max_packet))
    h_bytes = model.wire.activation(Smashed, (8, *model.sfprompt_shapes.h), "int8", Stamp("d"))
    assert h_bytes > 2 * model.link.limit  # SMASHED did travel in chunks
    from tests.federation.harness import digits_images

    labels = digits_images()[1]
    for device_id, local, start in (("dev-0", 37, 0), ("dev-1", 22, 37)):
        counts = np.bincount(labels[start : start + local]).tolist()
        stats = record["devices"][device_id]
        assert stats["local_samples"] == local
        assert stats["kept"] == kept_samples(local, 0.5, counts)  # the default per-class rule
        metrics, memory = update_maps(stats)
        assert set(metrics) == set(UPDATE_METRICS) and set(memory) == set(UPDATE_MEMORY)
        settings = observer.tasks[(device_id, 1)]
        assert (settings.encoding, settings.batch_size) == ("int8", 8)
        rb = model.sfprompt_round(local, settings, device_id, 1, metrics, memory, counts, "fp16")
        measured = {k: int(stats[k]) for k in RoundBytes(0, 0, 0, 0).metrics()}
        assert rb.metrics() == measured, device_id
