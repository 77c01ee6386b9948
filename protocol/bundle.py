"""The bundle manifest: the contract between the exporter, the device and the server.

The exporter writes `manifest.json` beside the files of a bundle; both sides read it with
`load_manifest`, which checks the protocol version and the sha256 of every file before any
graph or weight is opened, so that a corrupt or foreign bundle fails here with a message that
names the problem rather than deep inside onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .version import PROTOCOL_VERSION

MANIFEST_NAME = "manifest.json"
BATCH = "batch"  # the symbolic name of the dynamic batch dimension in every shape
PROMPT_KEY = "prompt.tokens"  # the prompt's key in every weights file; tail keys start "tail."


_CONTRACT_FIELDS = (
    "protocol_version",
    "model",
    "model_args",
    "num_classes",
    "prompts",
    "head_blocks",
    "tail_blocks",
    "depth",
    "embed_dim",
    "num_prefix_tokens",
    "num_patches",
    "tail_input",
    "parameters",
    "frozen_sha256",
)


class BundleError(ValueError):
    """A bundle on disk is missing, corrupt, from a newer protocol, or does not fit."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a reader expects: a graph input or output, a trainable parameter, or what a
    message carries (`codec.Expectations`). Shape entries are sizes or `BATCH`, any size."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def dtype_matches(self, dtype: object) -> bool:
        return str(dtype) == self.dtype

    def shape_matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (BATCH, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def check(self, array_shape: tuple[int, ...], array_dtype: str) -> None:
        """Raise `BundleError` if an array does not fit this spec."""
        if not self.dtype_matches(array_dtype):
            raise BundleError(f"{self.name}: expected dtype {self.dtype}, got {array_dtype}")
        if not self.shape_matches(array_shape):
            raise BundleError(
                f"{self.name}: expected shape {list(self.shape)}, got {list(array_shape)}"
            )


@dataclass(frozen=True)
class GraphSpec:
    """One computation the device runs, as an ONNX graph and its TorchScript twin."""

    onnx: str
    torchscript: str  # "" where a graph has no TorchScript twin
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


# What the tail reads of the body output z (`TailInput.kind`), and how many tokens that is:
PREFIX_TOKENS = "prefix_tokens"  # the first `count`: the class token (+ a DeiT's distillation)
MEAN_PATCH_TOKENS = "mean_patch_tokens"  # the mean of the patch tokens, as one token
ALL_PATCH_TOKENS = "all_patch_tokens"  # the patch tokens, when a per-token norm precedes pooling
ALL_TOKENS = "all_tokens"  # the whole sequence, when the tail holds blocks
TAIL_INPUT_KINDS = (PREFIX_TOKENS, MEAN_PATCH_TOKENS, ALL_PATCH_TOKENS, ALL_TOKENS)


@dataclass(frozen=True)
class TailInput:
    """What the tail reads of the body output z, so only that crosses the network: `kind` is
    one of `TAIL_INPUT_KINDS`, `count` the tokens it sends per sample."""

    kind: str
    count: int
    shape: tuple[int | str, ...]  # (batch, tokens, dim)


TAPE_GRAPHS = ("head_tape_forward", "head_tape_backward")  # h's training pass; since v0.13
LOCAL_GRAPHS = ("head_local_forward", "head_local_backward")  # t's only (export/head_rows.py)
HEAD_WEIGHTS_EXTRA = "head_weights"  # Manifest.extra key: fp32, fp16 or int8 head weights


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a bundle without opening its files."""

    role: str  # "device" or "server"
    protocol_version: int
    model: str
    model_args: dict[str, Any]
    num_classes: int
    prompts: int
    head_blocks: int
    tail_blocks: int
    depth: int
    embed_dim: int
    num_prefix_tokens: int
    num_patches: int
    export_batch: int
    opset: int
    tail_input: TailInput | None = None
    frozen_sha256: str = ""  # of the frozen head and body weights (SplitViT.frozen_fingerprint)
    classes: list[str] = field(default_factory=list)  # name of each logit; [] -> "0".."n-1"
    graphs: dict[str, GraphSpec] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)  # role -> file name
    parameters: dict[str, TensorSpec] = field(default_factory=dict)  # trainable, by key
    preprocess: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Name the classes "0".."n-1" when the export gave no names (manifests written before
        the field existed load that way), and refuse names that cannot be matched one to one."""
        names = list(self.classes) or default_class_names(self.num_classes)
        object.__setattr__(self, "classes", names)
        problem = class_names_problem(self.classes, self.num_classes)
        if problem:
            raise BundleError(f"manifest classes: {problem}")

    @property
    def tokens(self) -> int:
        """Sequence length of h and z: prefix tokens + prompts + patches."""
        return self.num_prefix_tokens + self.prompts + self.num_patches

    def contract_hash(self) -> str:
        """What device and server bundles of one export share: the model, the cut, the
        trainable parameters and the class names. A device whose hash differs cannot train with
        this server. Default names ("0".."n-1") are left out, so that bundles exported before
        classes were named keep their hash (and the server its checkpoints)."""
        contract = {k: v for k, v in asdict(self).items() if k in _CONTRACT_FIELDS}
        if self.classes != default_class_names(self.num_classes):
            contract["classes"] = list(self.classes)
        return hashlib.sha256(json.dumps(contract, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build from parsed JSON, raising `BundleError` on a missing or unknown field."""
        data = dict(data)
        try:
            tail = data.pop("tail_input", None)
            graphs = data.pop("graphs", {})
            params = data.pop("parameters", {})
            return cls(
                tail_input=None if tail is None else _tail_input(tail),
                graphs={k: _graph(v) for k, v in graphs.items()},
                parameters={k: _spec(v) for k, v in params.items()},
                **data,
            )
        except (TypeError, KeyError) as exc:
            raise BundleError(f"manifest does not match this sfprompt version: {exc}") from exc


def default_class_names(num_classes: int) -> list[str]:
    """The names of classes nobody named: their indices, "0".."n-1"."""
    return [str(i) for i in range(num_classes)]


def class_names_problem(classes: list[str], num_classes: int) -> str | None:
    """Why `classes` cannot name `num_classes` logits one to one, or None."""
    if len(classes) != num_classes:
        return f"{len(classes)} names for {num_classes} classes"
    if not all(isinstance(c, str) and c.strip() for c in classes):
        return f"every class name must be a non-empty string, got {list(classes)}"
    duplicates = sorted(name for name, n in Counter(classes).items() if n > 1)
    if duplicates:
        return f"class names must be unique; repeated: {duplicates}"
    return None


def _spec(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


def _graph(d: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        onnx=d["onnx"],
        torchscript=d["torchscript"],
        inputs=tuple(_spec(s) for s in d["inputs"]),
        outputs=tuple(_spec(s) for s in d["outputs"]),
    )


def _tail_input(d: dict[str, Any]) -> TailInput:
    return TailInput(kind=d["kind"], count=int(d["count"]), shape=tuple(d["shape"]))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write `manifest.json`, its `files` filled with the sha256 of every other file."""
    directory = Path(directory)
    files = {
        p.name: sha256_file(p)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }
    data = asdict(manifest)
    data["files"] = files
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))  # key order is meaningful
    tmp.replace(path)
    return path


def load_manifest(directory: Path | str, role: str | None = None, verify: bool = True) -> Manifest:
    """Read and check a bundle's manifest.

    Raises `BundleError` when the manifest is missing or unreadable, the bundle comes from a
    newer protocol version, the role is not the one expected, or (with `verify`) a file is
    missing or its sha256 differs from the manifest's.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{directory} is not a bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    version = data.get("protocol_version")
    if not isinstance(version, int):
        raise BundleError(f"{path}: protocol_version is missing or not an integer")
    if version > PROTOCOL_VERSION:
        raise BundleError(
            f"{directory} was written for protocol version {version}, but this sfprompt "
            f"speaks version {PROTOCOL_VERSION}: upgrade sfprompt on this machine"
        )
    manifest = Manifest.from_dict(data)
    if role is not None and manifest.role != role:
        raise BundleError(f"{directory} is a {manifest.role} bundle, expected a {role} bundle")
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Raise `BundleError` naming the first file that is missing or fails its checksum."""
    for name, expected in sorted(manifest.files.items()):
        path = Path(directory) / name
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {directory}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"bundle file {name} is corrupt: sha256 {actual[:12]}... does not match the "
                f"manifest's {expected[:12]}...; export the bundle again or copy it anew"
            )
