"""What an export is asked for (`ExportConfig`, the fields of `sfprompt-export bundle`), and the
parsing of timm model arguments: torch-free, so that every command's options and `--help` load
without PyTorch, and the server and the simulator can name a model without importing timm."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfprompt.options import opt
from sfprompt.protocol.bundle import class_names_problem, default_class_names

if TYPE_CHECKING:
    from .split_vit import Cut


class ModelError(ValueError):
    """The model name, its arguments or a checkpoint do not give a usable ViT."""


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Turn `key=value` strings into timm keyword arguments (ints, floats, bools kept)."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ModelError(f"model argument {pair!r} is not of the form key=value")
        args[key.replace("-", "_")] = _parse_value(raw)
    return args


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


HEAD_WEIGHTS = ("fp32", "fp16", "int8")


@dataclass
class ExportConfig:
    """What `sfprompt-export bundle` builds; every flag of the command is a field here."""

    model: str = field(
        default="vit_tiny_patch16_224",
        metadata=opt("timm model name, e.g. vit_base_patch16_224 or deit_small_patch16_224."),
    )
    num_classes: int | None = field(  # None: the count of `classes`, else 10
        default=None,
        metadata=opt("Classes of the task being tuned (default: the count of --classes, else 10)."),
    )
    classes: list[str] | None = field(  # the name of each logit; None: "0".."num_classes-1"
        default=None,
        metadata=opt(
            "Class names in logit order: a file with one a line, a data folder (its ImageFolder "
            "folders, CIFAR or .npz names) or a,b,c. Devices map their data to them by name "
            "(default: 0..N-1).",
            metavar="FILE|DIR|a,b,c",
        ),
    )
    pretrained: bool = field(
        default=False,
        metadata=opt(
            "Load timm's pre-trained weights (needs the network or a warm cache).",
            flag="--pretrained/--random-init",
        ),
    )
    checkpoint: Path | None = field(
        default=None,
        metadata=opt(
            "A local .safetensors or .pth state dict (read with weights_only=True).",
            exists=True,
            dir_okay=False,
        ),
    )
    model_args: dict[str, Any] = field(  # timm overrides, e.g. img_size
        default_factory=dict,
        metadata=opt(
            "timm override, repeatable: --model-arg img_size=32 --model-arg depth=4.",
            flag="--model-arg",
            metavar="KEY=VALUE",
            convert=parse_model_args,
        ),
    )
    prompts: int = field(default=10, metadata=opt("Learnable prompt tokens P."))
    head_blocks: int = field(
        default=1, metadata=opt("Blocks kept on the device before the body, K >= 1.")
    )
    tail_blocks: int = field(
        default=0, metadata=opt("Blocks kept on the device after the body, M >= 0.")
    )
    head_weights: str = field(
        default="fp32",
        metadata=opt(
            "How the device's ONNX head graphs store the frozen head weights: fp16 halves "
            "their bytes on disk and in the device's memory (the arithmetic stays float32; the "
            "head then computes with weights rounded to fp16); int8 quarters them and runs the "
            "head's weight products in int8 (faster on CPUs with integer dot products, h and "
            "the prompt's gradient within a few percent). TorchScript twins stay fp32.",
            choices=HEAD_WEIGHTS,
        ),
    )
    batch: int = field(  # the graphs accept any batch size
        default=8, metadata=opt("The device's planned batch size B (graphs take any).")
    )
    seed: int = field(
        default=0,
        metadata=opt("Seed of the prompt and of any random weights (same seed, same bundle)."),
    )
    out: Path = field(
        default=Path("bundle"), metadata=opt("Output folder; gets device/ and server/.")
    )

    def __post_init__(self) -> None:
        """Fix the class names before minutes of export, not after: the devices match their
        data to them by name, so there must be one unique name per logit."""
        if self.num_classes is None:
            self.num_classes = len(self.classes) if self.classes is not None else 10
        names = list(self.classes) if self.classes is not None else None
        self.classes = names or default_class_names(self.num_classes)
        problem = class_names_problem(self.classes, self.num_classes)
        if problem:
            raise ValueError(f"--classes: {problem} (--num-classes {self.num_classes})")

    @property
    def cut(self) -> Cut:
        from .split_vit import Cut  # torch: imported only once a cut is asked for

        return Cut(self.head_blocks, self.tail_blocks, self.prompts)
