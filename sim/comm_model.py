"""Exact bytes per device and round, from a bundle manifest and the protocol's own encoder.

The simulator measures bytes by running a federation, which is out of reach at the paper's
scale (ViT-Base, 50,000 CIFAR-10 images, 100 devices) on one machine. This model gives the same
numbers without running one: every message size is the length of a real message encoded by
`protocol.codec.encode` (zeros of the right shapes), cut into chunks as `MqttClient.packets` cuts
it, so it follows the codec, the encodings (fp32 / fp16 / bf16 / int8 with its per-row scales)
and chunking wherever they go. Each direction has its own encoding, as on the wire: SMASHED and
GRAD_Z in the TASK's `encoding`, BODY_OUT and GRAD_H in the server's `--encoding-down`
(`encoding_down` below; None: the same as up).

What is counted is what the real federation counts in `metrics.jsonl` (read by
`sim/run_split._result`): **MQTT payload bytes only**, i.e. the safetensors message, or the sum of
its chunk messages (each with its own header) when it exceeds one packet.

- `bytes_up_split`, `bytes_down_split`: the device's `MqttClient.traffic`, the payloads it
  published on its `smashed` and `grad_z` topics and received on `body_out` and `grad_h`, over one
  round (`edge_client/device.py`, `run_round`).
- `bytes_down_task`: the server, the sum of the TASK packets it published to that device
  (`cloud_server/coordinator.py`, `_send_tasks`).
- `bytes_up_update`: the server, the UPDATE's payload as it arrived, its chunks put together
  (`Inbound.payload_bytes`; chunked only above 8 MiB of prompt + tail): `len(encode(update))`
  (`cloud_server/round_state.py`, `file_update`).

Not counted, here or there: the MQTT fixed header, topic and v5 properties (content type,
response topic, correlation data: about 100-200 bytes per packet), PUBACKs, TCP/IP and TLS
framing, and any request repeated after a timeout (the model assumes none).

Message sizes depend on the envelope's text (device id, round and step digits; a chunk's index)
and on the tensors' shapes, not on their values, except where a message carries free text: the
TASK's settings (its deadline) and the UPDATE's metrics and memory maps. Pass the real ones for
an exact count; the defaults are typical values, within a few bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.edge_client.pruning import keep_hardest
from sfprompt.protocol.bundle import ALL_TOKENS, Manifest
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import (
    BodyOut,
    GradH,
    GradZ,
    PhaseSettings,
    Smashed,
    Task,
    Update,
)

from .wire_sizes import Link, Stamp, WireSizes

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from sfprompt.export.split_vit import Cut

UPDATE_METRICS = (
    "local_loss",
    "split_loss",
    "kept",
    "local_samples",
    "split_steps",
    "bytes_up_split",
    "bytes_down_split",
)
"""The `metrics` map of a device's UPDATE (`edge_client/device.py`); the rest is `memory`."""

UPDATE_MEMORY = tuple(
    ["peak_rss_mb"]
    + [
        f"{phase}_{what}"
        for phase in ("self_update", "split_train")
        for what in ("peak_rss_mb", "uss_mb", "cpu_s", "s")
    ]
)
"""The `memory` map of a device's UPDATE: peak RSS, then per phase (`MemoryProfiler`)."""

TYPICAL_DEADLINE = 1_767_225_600.123456
"""A TASK deadline (unix seconds) whose text is as long as a real one's, within a digit."""

_TYPICAL_VALUE = 123.45678901234568  # a float whose text (repr) is as long as most measured ones


@dataclass(frozen=True)
class SplitShapes:
    """Per-sample shapes of the split tensors: h and dL/dh (tokens, D); z and dL/dz."""

    h: tuple[int, ...]
    z: tuple[int, ...]

    @classmethod
    def from_manifest(cls, manifest: Manifest, prompts: bool = True) -> SplitShapes:
        """SFPrompt's shapes; with `prompts=False` SFL's, whose head adds no prompt tokens."""
        tokens = manifest.tokens - (0 if prompts else manifest.prompts)
        h = (tokens, manifest.embed_dim)
        tail = manifest.tail_input
        if tail is None or tail.kind == ALL_TOKENS:  # the whole sequence goes down
            return cls(h, h)
        return cls(h, tuple(int(n) for n in tail.shape[1:]))


@dataclass(frozen=True)
class RoundBytes:
    """One device's payload bytes in one round, by direction and phase.

    For SFPrompt the fields are the server's counters (`metrics()`); for SFL and FL the
    "model" fields hold the weights sent each way instead of TASK and UPDATE.
    """

    up_split: int
    down_split: int
    down_model: int
    up_model: int

    @property
    def up(self) -> int:
        return self.up_split + self.up_model

    @property
    def down(self) -> int:
        return self.down_split + self.down_model

    @property
    def total(self) -> int:
        return self.up + self.down

    def metrics(self) -> dict[str, int]:
        """Named as in `metrics.jsonl`, to compare with a real federation's record."""
        return {
            "bytes_up_split": self.up_split,
            "bytes_down_split": self.down_split,
            "bytes_down_task": self.down_model,
            "bytes_up_update": self.up_model,
        }


def kept_samples(samples: int, keep_ratio: float, class_counts: Sequence[int] | None = None) -> int:
    """How many samples EL2N pruning keeps, counted by the device's own `keep_hardest`:
    ceil(gamma * n) over the whole set, or with `class_counts` (samples per class, summing to
    `samples`; the default per-class rule) the sum of ceil(gamma * n_c), a few more."""
    labels = None
    if class_counts is not None:
        if sum(class_counts) != samples:
            raise ValueError(f"class counts {list(class_counts)} do not sum to {samples}")
        labels = np.repeat(np.arange(len(class_counts)), class_counts)
    return len(keep_hardest(np.zeros(samples, np.float32), keep_ratio, labels))


def batch_sizes(samples: int, batch: int) -> list[int]:
    """One pass over `samples` in batches of `batch`, the last one partial, as
    `edge_client.phases.batches` and `sim.baselines.batches` cut it."""
    return [min(batch, samples - start) for start in range(0, samples, batch)]


def typical_update_maps(
    kept: int, local_samples: int, steps: int, up_split: int, down_split: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The metrics and memory maps a device puts in its UPDATE, with typical values: their
    text, and so the UPDATE's size, varies with the values by a few bytes."""
    metrics = {
        "local_loss": _TYPICAL_VALUE,
        "split_loss": _TYPICAL_VALUE,
        "kept": float(kept),
        "local_samples": float(local_samples),
        "split_steps": float(steps),
        "bytes_up_split": float(up_split),
        "bytes_down_split": float(down_split),
    }
    return metrics, dict.fromkeys(UPDATE_MEMORY, _TYPICAL_VALUE)


def typical_settings(keep_ratio: float, batch_size: int, encoding: str) -> PhaseSettings:
    """A TASK's settings at the server's defaults (`sfprompt-cloud serve`)."""
    return PhaseSettings(
        keep_ratio=keep_ratio,
        local_epochs=RoundConfig.local_epochs,
        local_lr=RoundConfig.local_lr,
        split_lr=RoundConfig.split_lr,
        deadline=TYPICAL_DEADLINE,
        split_epochs=RoundConfig.split_epochs,
        batch_size=batch_size,
        encoding=encoding,
        prune=RoundConfig.prune,
    )


@dataclass
class CommModel:
    """Bytes per device and round of SFPrompt, SFL and FL, for the model a bundle was cut from.

    The manifest gives the shapes of h, z and the prompt + tail; SFL's and FL's weights are
    sizes in bytes (`sfl_weights_bytes`, `fl_full_weights_bytes`), which need the whole model.
    """

    manifest: Manifest
    link: Link = field(default_factory=Link)
    # Samples per split exchange of an SFPrompt device: its --micro-batch (4 by default) where
    # its head keeps a tape (the onnx runtime's default: `phases.split_gradients`); None, a
    # batch per exchange (--lean, the TorchScript runtime). The bytes of the tensors are the
    # same either way; each exchange adds its envelopes.
    exchange_batch: int | None = 4

    def __post_init__(self) -> None:
        self.wire = WireSizes(self.link)
        self.sfprompt_shapes = SplitShapes.from_manifest(self.manifest)
        self.sfl_shapes = SplitShapes.from_manifest(self.manifest, prompts=False)

    # ---- the split exchange -------------------------------------------------------------------
    def split_batch(
        self,
        batch: int,
        encoding: str,
        stamp: Stamp,
        shapes: SplitShapes | None = None,
        encoding_down: str | None = None,
    ) -> tuple[int, int]:
        """(up, down) of one batch: SMASHED + GRAD_Z up in `encoding`, BODY_OUT + GRAD_H down
        in `encoding_down` (None: `encoding`)."""
        shapes = shapes or self.sfprompt_shapes
        down_encoding = encoding_down or encoding
        h, z = (batch, *shapes.h), (batch, *shapes.z)
        up = self.wire.activation(Smashed, h, encoding, stamp)
        up += self.wire.activation(GradZ, z, encoding, stamp)
        down = self.wire.activation(BodyOut, z, down_encoding, stamp)
        down += self.wire.activation(GradH, h, down_encoding, stamp)
        return up, down

    def split(
        self,
        samples: int,
        batch: int,
        encoding: str,
        device_id: str = "device-000",
        round: int = 1,
        epochs: int = 1,
        first_step: int = 1,
        shapes: SplitShapes | None = None,
        encoding_down: str | None = None,
        exchange: int | None = None,
    ) -> tuple[int, int]:
        """(up, down) of `epochs` passes over `samples`, each batch in exchanges of `exchange`
        samples (None: one per batch); steps count exchanges from `first_step` through the
        round (`SplitLink` numbers them from 1, never restarting at an epoch)."""
        up = down = 0
        step = first_step
        for _ in range(epochs):
            for size in batch_sizes(samples, batch):
                for part in batch_sizes(size, exchange or size):
                    stamp = Stamp(device_id, round, step)
                    u, d = self.split_batch(part, encoding, stamp, shapes, encoding_down)
                    up, down, step = up + u, down + d, step + 1
        return up, down

    # ---- prompt + tail each way ---------------------------------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        """The prompt + tail as the TASK and UPDATE carry them (zeros: sizes only)."""
        return {
            key: np.zeros(tuple(int(n) for n in spec.shape), np.float32)
            for key, spec in self.manifest.parameters.items()
        }

    def task(self, settings: PhaseSettings, device_id: str = "device-000", round: int = 1) -> int:
        """The TASK to one device, as the server's `bytes_down_task` counts it (its packets)."""
        task = Task(device_id=device_id, round=round, params=self.params(), settings=settings)
        return self.wire.message(task)

    def update(
        self,
        samples: int,
        metrics: Mapping[str, float],
        memory: Mapping[str, float],
        device_id: str = "device-000",
        round: int = 1,
    ) -> int:
        """The UPDATE, as the server's `bytes_up_update` counts it: encoded, unchunked."""
        update = Update(
            device_id=device_id,
            round=round,
            params=self.params(),
            samples=samples,
            metrics=dict(metrics),
            memory=dict(memory),
        )
        return len(encode(update))

    # ---- whole rounds -------------------------------------------------------------------------
    def sfprompt_round(
        self,
        local_samples: int,
        settings: PhaseSettings,
        device_id: str = "device-000",
        round: int = 1,
        metrics: Mapping[str, float] | None = None,
        memory: Mapping[str, float] | None = None,
        class_counts: Sequence[int] | None = None,
        encoding_down: str | None = None,
    ) -> RoundBytes:
        """A device with `local_samples` images: split training on the samples it keeps, in
        batches of `settings.batch_size` (each in exchanges of `exchange_batch`), plus its
        TASK down and UPDATE up.

        Activations go up in `settings.encoding` and come down in `encoding_down` (the server's
        `RoundConfig.down_encoding`, which the TASK does not carry; None: the same as up).

        `metrics` and `memory`: the UPDATE's maps, for an exact count (default: typical ones).
        `class_counts`: its samples per class, for the per-class pruning rule (`settings.prune`
        "class"); None counts ceil(gamma n), which equals it when every class divides evenly.
        """
        by_class = class_counts if settings.prune == "class" else None
        kept = kept_samples(local_samples, settings.keep_ratio, by_class)
        up, down = self.split(
            kept,
            settings.batch_size,
            settings.encoding,
            device_id,
            round,
            settings.split_epochs,
            encoding_down=encoding_down,
            exchange=self.exchange_batch,
        )
        if metrics is None or memory is None:
            steps = settings.split_epochs * len(batch_sizes(kept, settings.batch_size))
            typical = typical_update_maps(kept, local_samples, steps, up, down)
            metrics = typical[0] if metrics is None else metrics
            memory = typical[1] if memory is None else memory
        task = self.task(settings, device_id, round)
        update = self.update(max(1, kept), metrics, memory, device_id, round)
        return RoundBytes(up, down, task, update)

    def sfl_round(
        self,
        samples: int,
        batch: int,
        encoding: str,
        weights_bytes: int,
        epochs: int = 1,
        device_id: str = "device-000",
        round: int = 1,
        encoding_down: str | None = None,
    ) -> RoundBytes:
        """SFL (SplitFed v2): every sample through split training with a prompt-less head,
        and head + tail weights (`weights_bytes`) each way, as `sim/sfl.py` counts it."""
        up, down = self.split(
            samples, batch, encoding, device_id, round, epochs, 1, self.sfl_shapes, encoding_down
        )
        return RoundBytes(up, down, weights_bytes, weights_bytes)


def fl_round(weights_bytes: int) -> RoundBytes:
    """FL full fine-tuning: every weight down and back (`FlRun`), nothing else."""
    return RoundBytes(0, 0, weights_bytes, weights_bytes)


def sfl_weights_bytes(vit: VisionTransformer, cut: Cut) -> int:
    """Head + tail as SFL sends them each way: `SflRun`'s own safetensors size."""
    from .baselines import BaselineConfig
    from .sfl import SflRun

    return SflRun(vit, cut, BaselineConfig()).size


def fl_full_weights_bytes(vit: VisionTransformer) -> int:
    """Every weight, as FL full fine-tuning sends it each way (`FlRun`'s `weights_bytes`)."""
    from .baselines import weights_bytes

    return weights_bytes({key: p.detach().numpy() for key, p in vit.named_parameters()})


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN for an empty denominator (a table cell, not an error)."""
    return numerator / denominator if denominator else math.nan
