"""SFPrompt's bytes per round at the paper's scale, per encoding, as a ratio to FL full fine-tuning.

The setting is the one where docs/simulation.md ("Bytes at the paper's scale", counted by
`bench/bench_comm.py`) finds the paper's 0.47x: ViT-Base (K = 1, M = 0, 10 prompts, 10 classes),
batch 128, 50,000 images over 100 devices, gamma = 0.5, so 0.466x in fp32. The count is the same
code's (`CommModel.sfprompt_round` against `fl_round`, typical TASK and UPDATE); only the
manifest comes from the server's in-memory cut (`ServerModel.from_timm`, random weights) rather
than an exported bundle, which has the same shapes and trainable parameters (their contract
hashes agree) and takes seconds instead of an ONNX export.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sfprompt.export.config import ExportConfig

from .comm_model import (
    CommModel,
    RoundBytes,
    fl_full_weights_bytes,
    fl_round,
    ratio,
    typical_settings,
)


def paper_cut() -> ExportConfig:
    """ViT-Base, K = 1, M = 0, 10 prompts, 10 classes, batch 128: the paper's setting."""
    return ExportConfig(model="vit_base_patch16_224", num_classes=10, batch=128)


@dataclass(frozen=True)
class PaperScale:
    """The model and cut (as the exporter takes them) and the federation the ratio is counted
    for (defaults: the paper's)."""

    cut: ExportConfig = field(default_factory=paper_cut)
    images: int = 50_000
    clients: int = 100
    keep_ratio: float = 0.5

    @property
    def samples(self) -> int:
        """Images per device (the federation's split evenly)."""
        return self.images // self.clients

    def describe(self) -> str:
        c = self.cut
        return (
            f"{c.model}, K={c.head_blocks} M={c.tail_blocks} P={c.prompts}, batch "
            f"{c.batch}, {self.images:,} images over {self.clients} devices "
            f"({self.samples:,} each), gamma {self.keep_ratio:g}"
        )


@dataclass(frozen=True)
class ScaleBytes:
    """One device's round at that scale: SFPrompt's bytes and FL full fine-tuning's."""

    sfprompt: RoundBytes
    fl_full: RoundBytes

    @property
    def vs_fl_full(self) -> float:
        return ratio(self.sfprompt.total, self.fl_full.total)


class PaperScaleModel:
    """Builds the model once (a few seconds for ViT-Base), then counts any pair of encodings."""

    def __init__(self, scale: PaperScale = PaperScale()) -> None:
        from sfprompt.cloud_server.body_model import ServerModel
        from sfprompt.cloud_server.config import BodyConfig

        server = ServerModel.from_timm(scale.cut, BodyConfig(device="cpu"))
        self.scale = scale
        self.comm = CommModel(server.manifest)
        self.fl_weights = fl_full_weights_bytes(server.split.vit)

    def round_bytes(self, encoding: str, encoding_down: str | None = None) -> ScaleBytes:
        """Activations up in `encoding`, down in `encoding_down` (None: the same)."""
        s = self.scale
        settings = typical_settings(s.keep_ratio, s.cut.batch, encoding)
        sfprompt = self.comm.sfprompt_round(s.samples, settings, encoding_down=encoding_down)
        return ScaleBytes(sfprompt, fl_round(self.fl_weights))
