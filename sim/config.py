"""`SimConfig`: every option of `sfprompt-sim`, with its default and help (sfprompt/options.py).

The round settings default as `sfprompt-cloud serve`'s (`RoundConfig`), which runs them in the
split methods' federations, so the simulator and a real deployment start from the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.export.config import HEAD_WEIGHTS, parse_model_args
from sfprompt.options import opt
from sfprompt.protocol.messages import PRUNE_MODES

from .audit_settings import DEFAULT_ACCURACY, DEFAULT_SETTINGS, check_specs
from .encodings import Setting
from .results import METHODS

# SFL is left out of the default only for `make demo`'s 15 minutes: add it with --methods
# (its bytes at any scale are in sim/comm_model.py without running it).
DEFAULT_METHODS = ("sfprompt", "sfl_linear", "fl_full")

CACHE = Path.home() / ".cache" / "sfprompt"  # where trained backbones are kept


def _all_if_zero(count: int) -> int | None:
    return count or None


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


@dataclass(frozen=True)
class SimConfig:
    """Every option of `sfprompt-sim`; `--config FILE` fills the same fields."""

    data: str = field(
        default="fashion-mnist",
        metadata=opt(
            "fashion-mnist (offline: classes 0-4 federated, the model pre-trained on 5-9), "
            "digits (the same split of sklearn's digits, seconds-long), cifar10, cifar100, svhn, "
            "flowers102, caltech101, food101, mnist, kmnist, fashionmnist (torchvision), or an "
            "ImageFolder path."
        ),
    )
    root: Path | None = field(
        default=None,
        metadata=opt(
            "Where the data set's files are (fashion-mnist: /usr/share/datasets/fashion-mnist)."
        ),
    )
    download: bool = field(
        default=False, metadata=opt("Download a torchvision data set if missing.")
    )
    max_train: int | None = field(  # a seeded stratified subset (None: all)
        default=1800,
        metadata=opt(
            "Federate at most this many training images (a stratified subset; 0: all).",
            convert=_all_if_zero,
        ),
    )
    max_test: int | None = field(
        default=2000,
        metadata=opt(
            "Evaluate on at most this many test images (a stratified subset; 0: all).",
            convert=_all_if_zero,
        ),
    )
    model: str | None = field(  # None: the small ViT pre-trained on classes 5-9
        default=None,
        metadata=opt("A timm ViT name (default: the small digits ViT, pre-trained here)."),
    )
    model_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=opt(
            "timm overrides, e.g. img_size=32 (repeatable).",
            flag="--model-arg",
            metavar="KEY=VALUE",
            convert=parse_model_args,
        ),
    )
    pretrained: bool = field(default=False, metadata=opt("timm's pre-trained weights for --model."))
    checkpoint: Path | None = field(
        default=None, metadata=opt("Local weights for --model.", exists=True)
    )
    pretrain_epochs: int | None = field(  # None: the data set's default (sim/pretrain.py)
        default=None,
        metadata=opt("Pre-training epochs of the default backbone (default: the shipped one's)."),
    )
    clients: tuple[int, ...] = field(
        default=(5,),
        metadata=opt("Devices; several (5,10,20,50) run a clients-count sweep.", comma_list=True),
    )
    rounds: int = field(default=5, metadata=opt("Rounds of every method."))
    partitions: tuple[str, ...] = field(
        default=("iid", "dirichlet"),
        metadata=opt(
            "How labels spread over devices: iid, dirichlet (at --alpha) or dirichlet:ALPHA; "
            "each is a column of the comparison.",
            comma_list=True,
        ),
    )
    alpha: float = field(
        default=0.1,
        metadata=opt("Dirichlet concentration (smaller: more skewed), as in the paper."),
    )
    seeds: int = field(
        default=3,
        metadata=opt(
            "Runs of every method per partition (seeds --seed, --seed + 1, ...): mean ± std."
        ),
    )
    ceilings: bool = field(
        default=True,
        metadata=opt(
            "Centralised linear probe, prompt + tail and full fine-tuning on the same backbone."
        ),
    )
    ceiling_epochs: int = field(default=5, metadata=opt("Epochs of each ceiling."))
    methods: tuple[str, ...] = field(
        default=DEFAULT_METHODS,
        metadata=opt(f"Any of: {', '.join(METHODS)}.", comma_list=True),
    )
    encodings: tuple[str, ...] = field(
        default=(),
        metadata=opt(
            "An encodings sweep: SFPrompt once per setting (fp32, fp16, bf16, int8, or UP/DOWN "
            "such as int8/fp16: int8 up, fp16 down) on the comparison's partitions and seeds, "
            "against fp32 (always run, or taken from --methods' sfprompt).",
            comma_list=True,
            metavar="ENC[/DOWN],...",
        ),
    )
    prompts: int = field(default=10, metadata=opt("Learnable prompt tokens."))
    head_blocks: int = field(default=1, metadata=opt("Blocks on the device before the body."))
    tail_blocks: int = field(default=0, metadata=opt("Blocks on the device after the body."))
    head_weights: str = field(
        default="fp32",
        metadata=opt(
            "How the devices' head graphs hold the frozen head weights (sfprompt-export's "
            "--head-weights): int8 runs the head's products in int8, fp16 halves the weights.",
            choices=HEAD_WEIGHTS,
        ),
    )
    # The round settings default as `sfprompt-cloud serve`'s (RoundConfig), which runs them.
    keep_ratio: float = field(
        default=RoundConfig.keep_ratio,
        metadata=opt("gamma: fraction each device keeps by EL2N pruning."),
    )
    prune: str = field(
        default=RoundConfig.prune,
        metadata=opt(
            "EL2N keeps the hardest gamma of each class, or of each device's whole set (the "
            "paper's rule; the sfprompt_global_prune method runs it beside).",
            choices=PRUNE_MODES,
        ),
    )
    local_epochs: int = field(
        default=RoundConfig.local_epochs, metadata=opt("Epochs of the local-loss phase.")
    )
    local_lr: float = field(
        default=RoundConfig.local_lr,
        metadata=opt(
            "Local-loss phase (the paper: 1e-4); the same default as sfprompt-cloud serve."
        ),
    )
    split_lr: float = field(
        default=RoundConfig.split_lr,
        metadata=opt("Split-training phase; the same default as sfprompt-cloud serve."),
    )
    baseline_lr: float = field(
        default=0.01, metadata=opt("SGD (momentum 0.9) learning rate of FL and SFL.")
    )
    batch_size: int = field(
        default=RoundConfig.batch_size, metadata=opt("Batch size of every method.")
    )
    server_lr: float = field(
        default=RoundConfig.server_lr,
        metadata=opt("eta_g: new = old + eta_g * weighted mean(client - old)."),
    )
    # Devices' defenses in the split federations (sfprompt, its ablations, sfl_linear), as
    # serve's --defense-* flags; SFL and the FL baselines run without them.
    defense_clip: float | None = field(
        default=RoundConfig.defense_clip,
        metadata=opt("C: each device scales each sample's h to L2 norm <= C. Default: off."),
    )
    defense_noise: float = field(
        default=RoundConfig.defense_noise,
        metadata=opt("sigma: N(0, (sigma C)^2) on every value of the clipped h."),
    )
    defense_grad_noise: float = field(
        default=RoundConfig.defense_grad_noise,
        metadata=opt("Noise on dL/dz, in units of the batch's largest row norm."),
    )
    defense_grad_max_norm: bool = field(
        default=RoundConfig.defense_grad_max_norm,
        metadata=opt("Li et al.'s max-norm noise on dL/dz."),
    )
    # The leakage audit (sim/audit.py): attacks on what one device sends, per defense setting.
    audit: bool = field(
        default=False,
        metadata=opt(
            "Also audit leakage: invert h (optimisation, learned decoder) and infer labels from "
            "dL/dz for each --audit-settings; writes audit.md / .json / .csv / .png."
        ),
    )
    audit_settings: tuple[str, ...] = field(
        default=DEFAULT_SETTINGS,
        metadata=opt(
            "Defense settings to attack: parts none, clip, clip=C, noise=SIGMA, grad-noise=K, "
            "max-norm joined by '+' (clip alone: C just above every public h's norm).",
            comma_list=True,
            metavar="SPEC,...",
        ),
    )
    audit_accuracy: tuple[str, ...] = field(
        default=DEFAULT_ACCURACY,
        metadata=opt(
            "Audit settings that also get an SFPrompt federation per seed (--seeds, the same "
            "for every setting), for accuracy (mean ± std) and bytes (about a minute each on "
            "digits).",
            comma_list=True,
            metavar="SPEC,...",
        ),
    )
    audit_images: int = field(default=32, metadata=opt("Device images the audit attacks."))
    audit_steps: int = field(default=150, metadata=opt("Adam steps of the inversion of h."))
    audit_decoder_epochs: int = field(
        default=15, metadata=opt("Epochs of the decoder trained on public images.")
    )
    uplink_mbps: float = field(
        default=12.0,
        metadata=opt(
            "Mbps, for the round-time estimate (the paper's appendix Table 1).", flag="--uplink"
        ),
    )
    downlink_mbps: float = field(
        default=54.0, metadata=opt("Mbps, for the round-time estimate.", flag="--downlink")
    )
    device_gflops: float = field(default=10.0, metadata=opt("Device compute, GFLOP/s."))
    server_gflops: float = field(default=10000.0, metadata=opt("Server compute, GFLOP/s."))
    seed: int = field(default=0, metadata=opt("The first seed (see --seeds)."))
    out: Path = field(default=Path("runs/sim"), metadata=opt("Where runs and the report go."))
    cache: Path = field(default=CACHE, metadata=opt("Where the pre-trained digits ViT is kept."))

    def __post_init__(self) -> None:
        """Refuse what would only fail after minutes of work."""
        if self.seeds < 1 or self.rounds < 1:
            raise ValueError(f"seeds and rounds must be >= 1, got {self.seeds}, {self.rounds}")
        if not self.partitions:
            raise ValueError("give at least one partition (iid, dirichlet or dirichlet:ALPHA)")
        for spec in self.partitions:
            kind, sep, value = spec.partition(":")
            valid = spec == "iid" or (kind == "dirichlet" and (not sep or _positive(value)))
            if not valid:
                raise ValueError(f"unknown partition {spec!r}: iid, dirichlet or dirichlet:ALPHA")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}")
        for setting in self.encodings:
            Setting.parse(setting)  # raises ValueError naming a bad one
        RoundConfig(  # raises ValueError naming a bad defense setting
            defense_clip=self.defense_clip,
            defense_noise=self.defense_noise,
            defense_grad_noise=self.defense_grad_noise,
            defense_grad_max_norm=self.defense_grad_max_norm,
        )
        if self.audit:
            self._check_audit()

    def _check_audit(self) -> None:
        if self.audit_images < 1 or self.audit_steps < 1 or self.audit_decoder_epochs < 0:
            raise ValueError(
                "--audit-images and --audit-steps must be >= 1, --audit-decoder-epochs >= 0"
            )
        check_specs(self.audit_settings, self.audit_accuracy)  # raises naming a bad spec
        if not any(m.startswith("sfprompt") for m in self.methods) and not self.encodings:
            raise ValueError("--audit attacks SFPrompt's traffic: add sfprompt to --methods")
