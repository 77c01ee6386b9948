"""`sfprompt-sim --audit`: what a curious server learns from SFPrompt's traffic, per defense.

For each defense setting (audit_settings.py) one device's images go through the eager split
model as a device would send them: h = head(x, prompt), then `Defense.protect_h`; z = body(h),
which the server computes; dL/dz of the device's batch-mean loss, then `Defense.protect_grad`.
The server, knowing the head, prompt, tail and settings, then runs the three attacks of
attacks.py on what was sent. For the settings of --audit-accuracy a short federation runs with
the same defense once per seed of --seeds (the same seeds, so the same partitions, for every
setting: a paired comparison), for the mean ± std of its accuracy and its bytes. The attacks use
the prompt and tail of the undefended federation's last round at the first seed (the bundle's
initial ones if it did not run): late in training, when the tail already predicts most labels by
itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.data.transforms import EvalTransform
from sfprompt.edge_client.defenses import Defense, row_norms
from sfprompt.units import MB

from . import attacks
from .audit_settings import AuditSetting, parse_setting
from .config import SimConfig
from .datasets import SimData, SimDataError, pretraining_set
from .results import MethodResult

Federate = Callable[[RoundConfig, Path, int], MethodResult]  # one federation at a seed, to its end
PUBLIC_LIMIT = 2000  # public images the decoder trains on, at most
SHOWN = 6  # images per setting in the figure


@dataclass
class AuditRow:
    """One defense setting: what each attack recovered, and what the defense cost."""

    setting: str
    defense: str  # Defense.describe()
    inversion_ssim: float
    inversion_psnr: float
    decoder_ssim: float
    decoder_psnr: float
    label_accuracy: float  # labels from dL/dz
    tail_accuracy: float  # labels the tail predicts from z alone, without any gradient
    chance: float  # 1 / classes: a uniform guess
    majority: float  # the most common audited label's share: always guessing it scores this
    accuracy: float | None = None  # mean final test accuracy of the seeds' federations
    accuracy_std: float | None = None  # their sample std (ddof=1; 0 for one seed)
    accuracy_runs: list[float] = field(default_factory=list)  # one per seed, in `seeds` order
    seeds: list[int] = field(default_factory=list)
    mb_per_round: float | None = None  # per device, up + down, mean over the seeds
    seconds: float = 0.0  # the attacks' wall time


@dataclass
class AuditResult:
    rows: list[AuditRow]
    images: np.ndarray  # (SHOWN, H, W) grey, the device's real images
    inversions: dict[str, np.ndarray]  # setting -> (SHOWN, H, W)
    decodings: dict[str, np.ndarray]
    clip_bound: float  # the automatic C
    params_from: str  # where the attacked prompt and tail came from
    public_images: int


class AuditModel:
    """The eager split model with one prompt and tail, as both the device and the server run it."""

    def __init__(self, model: ServerModel, params: dict[str, np.ndarray]) -> None:
        self.model = model
        self.prompt, self.tail_params = model.params_on_device(params)
        transform = EvalTransform.from_config(model.manifest.preprocess)
        self.transform = transform
        self.mean = torch.tensor(transform.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(transform.std).view(1, 3, 1, 1)
        self.skip = model.split.skip_tokens
        self.grid = tuple(model.split.vit.patch_embed.grid_size)
        self.patch = int(model.split.vit.patch_embed.patch_size[0])

    def head(self, pixels: torch.Tensor) -> torch.Tensor:
        """h of pixels (B, 3, H, W) in [0, 1], differentiable in the pixels."""
        return self.model.split.head((pixels - self.mean) / self.std, self.prompt)

    def h_of(self, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
        with torch.no_grad():
            starts = range(0, len(pixels), batch)
            parts = [self.head(torch.from_numpy(pixels[i : i + batch])) for i in starts]
        return torch.cat(parts).numpy()

    def tail(self, t: torch.Tensor) -> torch.Tensor:
        return self.model.run_tail(self.tail_params, t)


def pixels_of(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def public_images(cfg: SimConfig, data: SimData) -> np.ndarray:
    """What the server holds and the devices do not: its test set and, for digits and
    Fashion-MNIST, the pre-training classes 5-9; at most `PUBLIC_LIMIT`, (N, H, W, 3) uint8."""
    sets = [data.test_images]
    with contextlib.suppress(SimDataError):  # no pre-training classes for this data set
        sets.append(pretraining_set(cfg.data, data.test_images.shape[1], "train", cfg.root)[0])
    images = np.concatenate(sets)
    rng = np.random.default_rng(cfg.seed)
    return images[rng.permutation(len(images))[:PUBLIC_LIMIT]]


def automatic_clip(h: np.ndarray) -> float:
    """A C just above every public h's norm: it clips nothing and still bounds the sensitivity."""
    return float(math.ceil(row_norms(h).max()))


def clip_torch(h: torch.Tensor, bound: float | None) -> torch.Tensor:
    """The server's differentiable copy of the devices' clip, for inverting through it."""
    if bound is None:
        return h
    norms = h.flatten(1).norm(dim=1).clamp_min(1e-30)
    return h * (bound / norms).clamp(max=1.0).view(-1, *[1] * (h.dim() - 1))


@dataclass
class Sent:
    """What one device sent for the audited images under one defense, and what it reveals."""

    h: np.ndarray  # (N, T, D) protected
    labels_guessed: np.ndarray  # (N,) from dL/dz
    labels_predicted: np.ndarray  # (N,) the tail's own prediction on z


def device_traffic(
    am: AuditModel,
    pixels: np.ndarray,
    labels: np.ndarray,
    defense: Defense,
    batch: int,
    classes: int,
    rngs: tuple[np.random.Generator, np.random.Generator],
) -> Sent:
    """Send the images batch by batch as a device does (the loss is a batch mean and the
    gradient noise scales with the batch's largest row), and guess each batch's labels.
    `rngs` draw the noise on h and on dL/dz: two streams, so that settings with the same
    defense of h send the same h."""
    h_sent, guessed, predicted = [], [], []
    for start in range(0, len(pixels), batch):
        rows = slice(start, start + batch)
        h, _ = defense.protect_h(am.h_of(pixels[rows]), rngs[0])
        t = torch.from_numpy(am.model.body_forward(np.ascontiguousarray(h, dtype=np.float32)))
        leaf = t.clone().requires_grad_(True)
        target = torch.from_numpy(labels[rows].astype(np.int64))
        loss = torch.nn.functional.cross_entropy(am.tail(leaf), target)
        (grad,) = torch.autograd.grad(loss, leaf)
        grad_sent = defense.protect_grad(grad.numpy(), rngs[1])
        candidates = attacks.label_gradients(am.tail, t, classes)
        guessed.append(attacks.infer_labels(grad_sent, candidates))
        with torch.no_grad():
            predicted.append(am.tail(t).argmax(dim=1).numpy())
        h_sent.append(h)
    return Sent(np.concatenate(h_sent), np.concatenate(guessed), np.concatenate(predicted))


def decoder_for(
    am: AuditModel,
    public_h: np.ndarray,
    public_pixels: np.ndarray,
    defense: Defense,
    cfg: attacks.DecoderConfig,
) -> attacks.PatchDecoder:
    """A decoder trained on the public images' h as the devices would send it."""

    def tokens_of(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, _ = defense.protect_h(public_h[rows], rng)
        return np.ascontiguousarray(h[:, am.skip :], dtype=np.float32)

    decoder = attacks.PatchDecoder(public_h.shape[2], am.grid, am.patch)  # type: ignore[arg-type]
    return attacks.train_decoder(decoder, public_pixels, tokens_of, cfg)


@dataclass
class Reconstructed:
    """What the two attacks on h made of the device's images under one defense of h."""

    inversion_ssim: float
    inversion_psnr: float
    decoder_ssim: float
    decoder_psnr: float
    inversions: np.ndarray  # (SHOWN, H, W) grey
    decodings: np.ndarray


def attack_h(
    am: AuditModel,
    h_sent: np.ndarray,
    pixels: np.ndarray,
    public: tuple[np.ndarray, np.ndarray],
    defense: Defense,
    cfg: SimConfig,
) -> Reconstructed:
    """Invert `h_sent` by optimisation and by a decoder trained through `defense`."""
    grey = bool(np.allclose(public[1][:, :1], public[1][:, 1:]))  # the server knows it is grey
    inverse = attacks.InversionConfig(steps=cfg.audit_steps, grey=grey, seed=cfg.seed)
    inverted = attacks.invert_h(
        lambda px: clip_torch(am.head(px), defense.clip),
        torch.from_numpy(h_sent),
        pixels.shape[1:],
        inverse,
    )
    decoder_cfg = attacks.DecoderConfig(epochs=cfg.audit_decoder_epochs, seed=cfg.seed)
    decoder = decoder_for(am, public[0], public[1], defense, decoder_cfg)
    decoded = attacks.decode(decoder, np.ascontiguousarray(h_sent[:, am.skip :], np.float32))
    real = attacks.to_grey(pixels)
    inv, dec = attacks.to_grey(inverted), attacks.to_grey(decoded)
    return Reconstructed(
        float(attacks.ssim(real, inv).mean()),
        float(attacks.psnr(real, inv).mean()),
        float(attacks.ssim(real, dec).mean()),
        float(attacks.psnr(real, dec).mean()),
        inv[:SHOWN],
        dec[:SHOWN],
    )


def attack_setting(
    am: AuditModel,
    setting: AuditSetting,
    device: tuple[np.ndarray, np.ndarray],
    public: tuple[np.ndarray, np.ndarray],
    cfg: SimConfig,
    done: dict[str, Reconstructed],
) -> tuple[AuditRow, Reconstructed]:
    """The row of one setting. The attacks on h run once per h sent (`done`, by digest): a
    setting that differs from an earlier one only on dL/dz, or whose clip clipped nothing,
    sent the same h as it (the noise on h has its own seeded stream)."""
    start = time.perf_counter()
    pixels, labels = device
    classes = am.model.manifest.num_classes
    # The devices' noise, seeded here to be repeatable (a real device draws from OS entropy).
    rngs = (np.random.default_rng([cfg.seed, 0]), np.random.default_rng([cfg.seed, 1]))
    sent = device_traffic(am, pixels, labels, setting.defense, cfg.batch_size, classes, rngs)
    key = hashlib.sha256(np.ascontiguousarray(sent.h).tobytes()).hexdigest()
    if key not in done:
        done[key] = attack_h(am, sent.h, pixels, public, setting.defense, cfg)
    rec = done[key]
    row = AuditRow(
        setting=setting.name,
        defense=setting.defense.describe(),
        inversion_ssim=rec.inversion_ssim,
        inversion_psnr=rec.inversion_psnr,
        decoder_ssim=rec.decoder_ssim,
        decoder_psnr=rec.decoder_psnr,
        label_accuracy=float((sent.labels_guessed == labels).mean()),
        tail_accuracy=float((sent.labels_predicted == labels).mean()),
        chance=1.0 / classes,
        majority=float(np.bincount(labels).max() / len(labels)),
        seconds=time.perf_counter() - start,
    )
    return row, rec


def with_defense(rounds: RoundConfig, defense: Defense) -> RoundConfig:
    return replace(
        rounds,
        defense_clip=defense.clip,
        defense_noise=defense.noise,
        defense_grad_noise=defense.grad_noise,
        defense_grad_max_norm=defense.grad_max_norm,
    )


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1, as the comparison's), std 0 for a single value."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


@dataclass
class SeedRuns:
    """One setting's federations, one per seed: every setting gets the same seeds."""

    seeds: list[int]
    results: list[MethodResult]
    run_dirs: list[Path]

    def fill(self, row: AuditRow) -> None:
        """Put the seeds' accuracy (mean, std, each) and mean bytes into `row`."""
        finals = [r.final_accuracy for r in self.results]
        row.accuracy, row.accuracy_std = mean_std(finals)
        row.accuracy_runs, row.seeds = finals, list(self.seeds)
        row.mb_per_round = float(np.mean([r.bytes_per_round for r in self.results])) / MB


def audit_seeds(cfg: SimConfig) -> list[int]:
    """The simulation's seeds: --seed, --seed + 1, ... (--seeds of them)."""
    return list(range(cfg.seed, cfg.seed + cfg.seeds))


def run_federations(
    settings: list[AuditSetting],
    cfg: SimConfig,
    base: RoundConfig,
    federate: Federate,
    out: Path,
    say: Callable[[str], None],
) -> dict[str, SeedRuns]:
    """The federations of each setting in --audit-accuracy, one per seed of `audit_seeds`."""
    done = {}
    for setting in settings:
        if setting.name not in cfg.audit_accuracy:
            continue
        runs = SeedRuns([], [], [])
        for seed in audit_seeds(cfg):
            what = f"defense {setting.name!r}: {setting.defense.describe()}"
            say(f"audit: SFPrompt, seed {seed}, {what}")
            run_dir = out / "runs" / _slug(setting.name) / f"seed{seed}"
            result = federate(with_defense(base, setting.defense), run_dir, seed)
            say(f"  {setting.name}, seed {seed}: final accuracy {result.final_accuracy:.3f}")
            runs.seeds.append(seed)
            runs.results.append(result)
            runs.run_dirs.append(run_dir)
        done[setting.name] = runs
    return done


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def attacked_params(
    model: ServerModel, runs: dict[str, SeedRuns], settings: list[AuditSetting]
) -> tuple[dict[str, np.ndarray], str]:
    """The undefended federation's last global prompt and tail at the first seed (whose
    partition holds the audited device), or the bundle's initial ones."""
    for setting in settings:
        if setting.name in runs and not setting.defense.active:
            first = runs[setting.name]
            ckpt = load_checkpoint(first.run_dirs[0] / "server" / "checkpoint.safetensors")
            if ckpt is not None:
                where = f"the {setting.name!r} federation at seed {first.seeds[0]}"
                return ckpt.params, f"{where} after round {ckpt.round}"
    return model.initial_parameters(), "the bundle's initial prompt and tail (round 1's TASK)"


def run_audit(
    cfg: SimConfig,
    data: SimData,
    server_bundle: Path,
    device_indices: np.ndarray,
    base: RoundConfig,
    federate: Federate,
    out: Path,
    say: Callable[[str], None] = print,
) -> AuditResult:
    """Audit one device (the training images `device_indices`) under every --audit-settings."""
    model = ServerModel.from_bundle(server_bundle)
    public_pixels = pixels_of(public_images(cfg, data))
    chosen = np.asarray(device_indices)[: cfg.audit_images]
    device = (pixels_of(data.train_images[chosen]), data.train_labels[chosen])
    initial = AuditModel(model, model.initial_parameters())
    bound = automatic_clip(initial.h_of(public_pixels))
    say(
        f"audit: {len(chosen)} images of one device, {len(public_pixels)} public images, "
        f"automatic clip C = {bound:g}"
    )
    settings = [parse_setting(s, bound) for s in cfg.audit_settings]
    runs = run_federations(settings, cfg, base, federate, out, say)
    params, params_from = attacked_params(model, runs, settings)
    am = AuditModel(model, params)
    public = (am.h_of(public_pixels), public_pixels)
    rows, inversions, decodings, done = [], {}, {}, {}
    for setting in settings:
        row, rec = attack_setting(am, setting, device, public, cfg, done)
        if setting.name in runs:
            runs[setting.name].fill(row)
        say(
            f"audit {setting.name}: inversion SSIM {row.inversion_ssim:.3f}, decoder SSIM "
            f"{row.decoder_ssim:.3f}, labels {row.label_accuracy:.2f} ({row.seconds:.0f} s)"
        )
        rows.append(row)
        inversions[setting.name], decodings[setting.name] = rec.inversions, rec.decodings
    real = attacks.to_grey(device[0][:SHOWN])
    return AuditResult(rows, real, inversions, decodings, bound, params_from, len(public_pixels))


SplitRunner = Callable[..., tuple[object, MethodResult]]  # pipeline's run_split


def audit_simulation(
    cfg: SimConfig,
    data: SimData,
    server_bundle: Path,
    base: RoundConfig,
    run_split: SplitRunner,
    parts: list[np.ndarray],
    out: Path,
    say: Callable[[str], None] = print,
) -> AuditResult:
    """`sfprompt-sim --audit`: the audit of the first device of `parts` (the first partition's
    shards at the first seed); `audit_report` writes it. The federation at each seed gets that
    seed's partition, as the comparison's runs do."""
    from . import partition

    def federate(rounds: RoundConfig, run_dir: Path, seed: int) -> MethodResult:
        labels = data.train_labels
        clients = cfg.clients[0]
        seeded = parts if seed == cfg.seed else partition.partition_for(
            cfg.partitions[0], labels, clients, cfg.alpha, seed
        )  # fmt: skip
        folder = out / "audit" / "data" / f"seed{seed}"
        shards, test = partition.write_shards(data, seeded, folder)
        return run_split("sfprompt", replace(rounds, seed=seed), shards, test, run_dir)[1]

    return run_audit(cfg, data, server_bundle, parts[0], base, federate, out / "audit", say)
