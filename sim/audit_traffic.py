"""`sfprompt-audit`: the attacks of `sfprompt-sim --audit` on traffic a real server captured.

`sfprompt-cloud serve --capture DIR` keeps every h and dL/dz its body accepted and each round's
prompt + tail (cloud_server/traffic_capture.py). Here the server's own knowledge is rebuilt
from the capture and the server bundle: the eager head and tail with the round's params
(`AuditModel`), the round's defense, and z = body(h), computed from the captured h. Then, as
in sim/audit.py: inversion of h by optimisation, a decoder trained on `--public` images, and
labels from dL/dz.

With `--images` (the device's own data) the reconstructions are scored. Each captured row is
matched to the device image whose h, computed with the round's global params, is nearest: for
scoring only, since the attacker does not hold these images. It assumes the device sent those
images unaugmented through the bundle's preprocessing; the device's prompt has moved from the
global one by its local training, so the nearest h is close rather than equal (the distances
are reported).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.cloud_server.traffic_capture import (
    STEP_GLOB,
    CapturedRound,
    CapturedStep,
    CaptureError,
    StepInfo,
    read_round,
    read_step,
    round_path,
    step_info,
)
from sfprompt.data.transforms import EvalTransform
from sfprompt.edge_client.defenses import Defense, clip_rows

from . import attacks
from .audit import AuditModel, clip_torch, decoder_for

CHUNK = 16  # captured rows inverted at once: a step of the progress bar


@dataclass(frozen=True)
class AuditOptions:
    """How hard the attacks try (the defaults are `sfprompt-audit`'s, in audit_cli.py)."""

    steps: int
    decoder_epochs: int
    max_images: int
    seed: int = 0


@dataclass
class Capture:
    """A capture folder read back and checked against the bundle's model."""

    folder: Path
    steps: list[StepInfo]  # by round, device, step; their tensors are read one at a time
    rounds: dict[int, CapturedRound]

    @property
    def samples(self) -> int:
        return sum(s.batch for s in self.steps)


@dataclass
class Scores:
    """The attacks against the device's real images (only with --images)."""

    matched: np.ndarray  # (N,) the device image each captured row was matched to
    distance: np.ndarray  # (N,) |h - h(image)| / |h|: 0 for the image that was sent
    true_labels: np.ndarray  # (N,)
    real: np.ndarray  # (A, H, W) grey, the matched images of the attacked rows
    inversion_ssim: float
    inversion_psnr: float
    decoder_ssim: float | None
    decoder_psnr: float | None
    baseline_ssim: float  # each real image against another of the device's: what chance gives
    label_accuracy: float | None  # over rows with a captured dL/dz
    majority: float  # the most common true label's share: always guessing it scores this
    tail_accuracy: float


@dataclass
class TrafficAudit:
    """What a curious server recovers from a capture."""

    folder: Path
    devices: list[str]
    rounds: list[int]
    steps: int
    rows: list[tuple[str, int, int, int]]  # (device, round, step, row in the step), per sample
    guessed: np.ndarray  # (N,) labels from dL/dz, -1 where no dL/dz was captured
    predicted: np.ndarray  # (N,) what the tail predicts from z alone
    inversions: np.ndarray  # (A, H, W) grey, the first A = --max-images samples
    decodings: np.ndarray | None  # (A, H, W), with --public
    defenses: dict[int, str]  # round -> Defense.describe()
    classes: int
    public_images: int
    scores: Scores | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------ the capture


def load_capture(folder: Path, model: ServerModel) -> Capture:
    """Every step file of `folder` and the params of each round they belong to, checked against
    `model`'s manifest; raises CaptureError naming the file and the problem."""
    if not folder.is_dir():
        raise CaptureError(f"{folder}: no such capture folder (serve --capture DIR writes one)")
    paths = sorted(folder.glob(STEP_GLOB))
    if not paths:
        raise CaptureError(
            f"{folder}: empty capture, no step-*.safetensors: did a device train while "
            "serve --capture (or worker --capture) ran?"
        )
    steps = [_checked_step(step_info(p), model) for p in paths]
    steps.sort(key=lambda s: (s.round, s.device_id, s.step))
    rounds = {}
    for number in sorted({s.round for s in steps}):
        rounds[number] = _checked_round(round_path(folder, number), model)
    return Capture(folder, steps, rounds)


def _checked_step(step: StepInfo, model: ServerModel) -> StepInfo:
    batch = step.batch
    if step.h_shape != model.h_shape(batch):
        raise CaptureError(
            f"{step.path}: h is {list(step.h_shape)}, the bundle's model takes "
            f"{list(model.h_shape(batch))}: a capture from another bundle?"
        )
    if step.grad_shape is not None and step.grad_shape != model.z_shape(batch):
        raise CaptureError(
            f"{step.path}: grad_z is {list(step.grad_shape)}, the bundle's model gives "
            f"{list(model.z_shape(batch))}: a capture from another bundle?"
        )
    return step


def _checked_round(path: Path, model: ServerModel) -> CapturedRound:
    if not path.is_file():
        raise CaptureError(
            f"{path}: missing; the attacks need the round's prompt and tail. With body workers, "
            "serve --capture writes these files: give it the same DIR or copy them in"
        )
    captured = read_round(path)
    expected = model.manifest.contract_hash()
    if captured.contract_hash and captured.contract_hash != expected:
        raise CaptureError(
            f"{path}: captured from a server whose bundle differs from --bundle (contract "
            f"{captured.contract_hash[:12]}, the bundle's {expected[:12]})"
        )
    try:
        model.params_on_device(captured.params)
    except ValueError as exc:
        raise CaptureError(f"{path}: {exc}") from exc
    return captured


def defense_of(captured: CapturedRound) -> Defense:
    """The defense the round's TASK asked of the devices (what the server knows)."""
    s = captured.settings
    clip = s.get("defense_clip")
    return Defense(
        clip=None if clip is None else float(clip),  # type: ignore[arg-type]
        noise=float(s.get("defense_noise", 0.0)),  # type: ignore[arg-type]
        grad_noise=float(s.get("defense_grad_noise", 0.0)),  # type: ignore[arg-type]
        grad_max_norm=bool(s.get("defense_grad_max_norm", False)),
    )


def unit_pixels(model: ServerModel, images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, 3, H', W') in [0, 1] at the model's size: the bundle's own
    preprocessing (as a device applies it), with the normalisation taken back off."""
    transform = EvalTransform.from_config(model.manifest.preprocess)
    normalised = transform.from_uint8(images)
    mean = np.asarray(transform.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(transform.std, np.float32).reshape(1, 3, 1, 1)
    return np.clip(normalised * std + mean, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------- the attacks


@dataclass
class _Found:
    """What one pass over the capture's steps gives, in the capture's order."""

    guessed: list[np.ndarray] = field(default_factory=list)
    predicted: list[np.ndarray] = field(default_factory=list)
    matched: list[np.ndarray] = field(default_factory=list)
    distance: list[np.ndarray] = field(default_factory=list)
    inversions: list[np.ndarray] = field(default_factory=list)
    decodings: list[np.ndarray] = field(default_factory=list)


def audit_capture(
    capture: Capture,
    model: ServerModel,
    options: AuditOptions,
    public: np.ndarray | None = None,
    device: tuple[np.ndarray, np.ndarray] | None = None,
    console: Console | None = None,
) -> TrafficAudit:
    """The three attacks on `capture`, round by round with each round's prompt, tail and
    defense; `public` (N, 3, H, W) in [0, 1] trains the decoder, `device` (its pixels likewise,
    its labels) scores. `console` shows progress. Raises CaptureError for a damaged file."""
    start = time.perf_counter()
    grey = public is not None and bool(np.allclose(public[:, :1], public[:, 1:]))
    found, left = _Found(), options.max_images
    with _progress(console) as progress:
        steps_bar = progress.add_task("labels from dL/dz", total=len(capture.steps))
        invert_bar = progress.add_task("inversion of h", total=min(left, capture.samples))
        for number, captured in sorted(capture.rounds.items()):
            am, defense = AuditModel(model, captured.params), defense_of(captured)
            reference = None if device is None else _reference(am, defense, device[0])
            attacked = []
            for info in (s for s in capture.steps if s.round == number):
                step = read_step(info.path)
                _attack_step(am, step, reference, found)
                attacked.append(step.h[: max(left, 0)])
                left -= len(attacked[-1])
                progress.advance(steps_bar)
            rows = np.concatenate(attacked)
            if not len(rows):
                continue
            advance = lambda n: progress.advance(invert_bar, n)  # noqa: E731
            found.inversions.append(_invert(am, defense, rows, options, grey, advance))
            if public is not None:
                found.decodings.append(_decode(am, defense, rows, public, options, progress))
    audit = TrafficAudit(
        folder=capture.folder,
        devices=sorted({s.device_id for s in capture.steps}),
        rounds=sorted(capture.rounds),
        steps=len(capture.steps),
        rows=[
            (s.device_id, s.round, s.step, i) for s in capture.steps for i in range(s.h_shape[0])
        ],
        guessed=np.concatenate(found.guessed),
        predicted=np.concatenate(found.predicted),
        inversions=attacks.to_grey(np.concatenate(found.inversions)),
        decodings=attacks.to_grey(np.concatenate(found.decodings)) if found.decodings else None,
        defenses={n: defense_of(c).describe() for n, c in capture.rounds.items()},
        classes=model.manifest.num_classes,
        public_images=0 if public is None else len(public),
    )
    if device is not None:
        audit.scores = score(audit, found, device, options.seed)
    audit.seconds = time.perf_counter() - start
    return audit


@contextmanager
def _progress(console: Console | None) -> Iterator[Progress]:
    with Progress(console=console, disable=console is None, transient=True) as progress:
        yield progress


def _reference(am: AuditModel, defense: Defense, pixels: np.ndarray) -> np.ndarray:
    """The h of the device's images with the round's global params, clipped as sent: what the
    captured rows are matched against, for scoring."""
    reference = am.h_of(pixels)  # (M, T, D)
    return reference if defense.clip is None else clip_rows(reference, defense.clip)[0]


def _attack_step(
    am: AuditModel, step: CapturedStep, reference: np.ndarray | None, found: _Found
) -> None:
    """Labels from the step's dL/dz (-1 without one), the tail's own guess from z, and (for
    scoring) the device image each row came from."""
    t = torch.from_numpy(am.model.body_forward(step.h))  # z, as the server computed it
    with torch.no_grad():
        found.predicted.append(am.tail(t).argmax(dim=1).numpy())
    if step.grad_z is None:
        found.guessed.append(np.full(len(step.h), -1))
    else:
        candidates = attacks.label_gradients(am.tail, t, am.model.manifest.num_classes)
        found.guessed.append(attacks.infer_labels(step.grad_z, candidates))
    if reference is not None:
        index, distance = _nearest(step.h, reference)
        found.matched.append(index)
        found.distance.append(distance)


def _invert(
    am: AuditModel,
    defense: Defense,
    rows: np.ndarray,
    options: AuditOptions,
    grey: bool,
    advance: Callable[[int], None],
) -> np.ndarray:
    """Pixels (A, 3, H, W) whose h, clipped as the devices clip, is nearest the captured h."""
    cfg = attacks.InversionConfig(steps=options.steps, grey=grey, seed=options.seed)

    def head(pixels: torch.Tensor) -> torch.Tensor:
        return clip_torch(am.head(pixels), defense.clip)

    parts = []
    for begin in range(0, len(rows), CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(rows[begin : begin + CHUNK]))
        parts.append(attacks.invert_h(head, chunk, am.transform.shape, cfg))
        advance(len(chunk))
    return np.concatenate(parts)


def _decode(
    am: AuditModel,
    defense: Defense,
    rows: np.ndarray,
    public: np.ndarray,
    options: AuditOptions,
    progress: Progress,
) -> np.ndarray:
    """The captured rows through a decoder trained on the public images' h, defended alike."""
    task = progress.add_task("training the decoder", total=None)
    cfg = attacks.DecoderConfig(epochs=options.decoder_epochs, seed=options.seed)
    decoder = decoder_for(am, am.h_of(public), public, defense, cfg)
    progress.remove_task(task)
    return attacks.decode(decoder, np.ascontiguousarray(rows[:, am.skip :], np.float32))


# ------------------------------------------------------------------------------- the scores


def score(
    audit: TrafficAudit, found: _Found, device: tuple[np.ndarray, np.ndarray], seed: int
) -> Scores:
    """The reconstructions and labels against the device images each captured row came from."""
    pixels, labels = device
    match = np.concatenate(found.matched)
    attacked = len(audit.inversions)
    grey = attacks.to_grey(pixels)
    real = grey[match[:attacked]]
    rng = np.random.default_rng(seed)
    others = (match[:attacked] + rng.integers(1, max(len(pixels), 2), attacked)) % len(pixels)
    truth = labels[match]
    has_grad = audit.guessed >= 0
    dec = audit.decodings
    return Scores(
        matched=match,
        distance=np.concatenate(found.distance),
        true_labels=truth,
        real=real,
        inversion_ssim=float(attacks.ssim(real, audit.inversions).mean()),
        inversion_psnr=float(attacks.psnr(real, audit.inversions).mean()),
        decoder_ssim=None if dec is None else float(attacks.ssim(real, dec).mean()),
        decoder_psnr=None if dec is None else float(attacks.psnr(real, dec).mean()),
        baseline_ssim=float(attacks.ssim(real, grey[others]).mean()),
        label_accuracy=float((audit.guessed == truth)[has_grad].mean()) if has_grad.any() else None,
        majority=float(np.bincount(truth).max() / len(truth)),
        tail_accuracy=float((audit.predicted == truth).mean()),
    )


def _nearest(h: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of h, the reference row nearest in L2, and that distance over |h|."""
    rows = torch.from_numpy(np.ascontiguousarray(h.reshape(len(h), -1), dtype=np.float32))
    refs = torch.from_numpy(np.ascontiguousarray(reference.reshape(len(reference), -1)))
    dist = torch.cdist(rows.double(), refs.double())  # (B, M)
    best, index = dist.min(dim=1)
    norms = rows.double().norm(dim=1).clamp_min(1e-30)
    return index.numpy(), (best / norms).numpy()


def load_server_model(bundle: Path) -> ServerModel:
    """The bundle's eager model on the CPU, where the attacks' tensors are."""
    return ServerModel.from_bundle(bundle, BodyConfig(device="cpu"))
