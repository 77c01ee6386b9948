"""How the federation trains (`RoundConfig`), and the pure steps of a round's start.

`RoundConfig` is what `sfprompt-cloud serve` and `sfprompt-sim` share; the round loop that runs
it is `coordinator.py`, one round's updates and aggregation are `round_state.py`; the buffered
mode's loop is `buffered_loop.py`, its inbox `buffer_inbox.py`, its arithmetic `buffered.py`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from sfprompt.options import opt
from sfprompt.protocol.messages import ENCODINGS, PRUNE_MODES, PhaseSettings

from .aggregation import RULES, AggregationConfig

Params = dict[str, np.ndarray]

SAME_ENCODING = "same"
"""`encoding_down`'s default: the server replies in the encoding of each request."""
DOWN_ENCODINGS = (SAME_ENCODING, *ENCODINGS)

SYNC = "sync"
BUFFERED = "buffered"
AGGREGATION_MODES = (SYNC, BUFFERED)


@dataclass(frozen=True)
class RoundConfig:
    """How the federation trains; every field is a flag of `sfprompt-cloud serve`."""

    rounds: int = field(default=10, metadata=opt("Rounds to run."))
    clients_per_round: int | None = field(
        default=None, metadata=opt("Devices per round (default: --fraction).")
    )
    fraction: float = field(
        default=1.0, metadata=opt("Fraction of the online devices selected per round.")
    )
    min_devices: int = field(
        default=1, metadata=opt("A round starts only with this many devices online.")
    )
    wait_for_devices_s: float = field(
        default=600.0,
        metadata=opt(
            "Seconds to wait for --min-devices before giving up.", flag="--wait-for-devices"
        ),
    )
    round_timeout_s: float = field(
        default=600.0,
        metadata=opt(
            "Deadline of each round (buffered: of each TASK, and the longest a round waits for "
            "its --buffer-size updates): later updates are rejected.",
            flag="--round-timeout",
        ),
    )
    offline_grace_s: float = field(
        default=10.0,
        metadata=opt(
            "Seconds a device may be offline mid-round before it is no longer awaited.",
            flag="--offline-grace",
        ),
    )
    server_lr: float = field(
        default=AggregationConfig.server_lr,
        metadata=opt("eta_g: new = old + eta_g * weighted mean(client - old)."),
    )
    keep_ratio: float = field(
        default=0.5, metadata=opt("gamma: fraction of each device's data kept by EL2N pruning.")
    )
    local_epochs: int = field(
        default=1, metadata=opt("Epochs of the local-loss phase (0 switches it off).")
    )
    # One set of defaults for `serve` and `sfprompt-sim` (which reads these), chosen by the sweep
    # in docs/simulation.md ("Choosing the learning rates"), starting from the paper's local 1e-4.
    local_lr: float = field(default=1e-3, metadata=opt("Learning rate of the local-loss phase."))
    split_lr: float = field(default=0.3, metadata=opt("Learning rate of split training."))
    split_epochs: int = field(default=1, metadata=opt("Epochs of split training per round."))
    batch_size: int = field(default=32, metadata=opt("Devices' batch size in both phases."))
    # fp16 by measurement (issue 13, docs/simulation.md "Encodings"): half the bytes of fp32,
    # accuracy within 1 point of it on the main job (+0.5 IID, +0.0 Dirichlet, 3 seeds).
    encoding: str = field(
        default="fp16",
        metadata=opt(
            "How activations and gradients travel (up: h and dL/dz; down too unless "
            "--encoding-down says otherwise).",
            choices=ENCODINGS,
        ),
    )
    # Per direction: the downlink is often wider than the uplink (the paper's 54 vs 12 Mbps),
    # so a deployment may keep z and dL/dh exact while squeezing what devices send.
    encoding_down: str = field(
        default=SAME_ENCODING,
        metadata=opt(
            "How the server's replies (z and dL/dh) travel; same: as each request came "
            "(--encoding). Each message names its own encoding, so devices decode any.",
            choices=DOWN_ENCODINGS,
        ),
    )
    prune: str = field(
        default="class",
        metadata=opt(
            "EL2N keeps the hardest gamma of each class, or of the whole local set (the paper's "
            "rule; it drops whole classes while the classifier is biased).",
            choices=PRUNE_MODES,
        ),
    )
    # Defenses against a curious server, applied by each device to what it sends and carried in
    # the TASK (edge_client/defenses.py; docs/threat-model.md, Defenses). Off by default.
    defense_clip: float | None = field(
        default=None,
        metadata=opt(
            "C: devices scale each sample's h to L2 norm <= C before sending it. Default: off."
        ),
    )
    defense_noise: float = field(
        default=0.0,
        metadata=opt(
            "sigma: devices add N(0, (sigma C)^2) to every value of the clipped h (needs "
            "--defense-clip); a Gaussian mechanism per release, not DP-SGD."
        ),
    )
    defense_grad_noise: float = field(
        default=0.0,
        metadata=opt(
            "Devices add Gaussian noise to dL/dz whose norm is this many times the batch's "
            "largest row norm: it turns the direction that betrays labels."
        ),
    )
    defense_grad_max_norm: bool = field(
        default=False,
        metadata=opt(
            "Devices add Li et al.'s max-norm noise to dL/dz: every row's expected norm "
            "becomes the batch's largest (hides the norm, barely the direction)."
        ),
    )
    seed: int = field(default=0, metadata=opt("Seed of the selection of devices per round."))
    max_devices: int = field(
        default=10_000,
        metadata=opt(
            "Devices the server knows at most; a full registry forgets the longest offline."
        ),
    )
    # Robust aggregation (docs/cloud_server.md, "Robust aggregation"); none of it is in the TASK.
    aggregation: str = field(
        default=AggregationConfig.rule,
        metadata=opt(
            "fedavg: sample-weighted mean; median / trimmed-mean: coordinate-wise and unweighted, "
            "robust to a minority of poisoned updates (docs/cloud_server.md, Robust aggregation).",
            choices=RULES,
        ),
    )
    trim_fraction: float = field(
        default=AggregationConfig.trim_fraction,
        metadata=opt("trimmed-mean: drop ceil(F * n) updates at each end of every coordinate."),
    )
    clip_norm: float | None = field(
        default=AggregationConfig.clip_norm,
        metadata=opt(
            "Scale each update's change (L2, all parameters) down to this norm. Default: off."
        ),
    )
    max_update_norm: float = field(
        default=AggregationConfig.max_update_norm,
        metadata=opt(
            "Refuse an update whose change (L2, all parameters) is larger ('inf': no bound)."
        ),
    )
    max_samples: int = field(
        default=AggregationConfig.max_samples,
        metadata=opt(
            "The most weight one device can claim in FedAvg (also capped at its local_samples)."
        ),
    )
    max_global_growth: float = field(
        default=AggregationConfig.max_global_growth,
        metadata=opt(
            "Keep the last good model if the new one's norm exceeds this times the old one's."
        ),
    )
    max_refusals: int = field(
        default=3,
        metadata=opt(
            "A device whose update is refused this many rounds in a row is no longer selected."
        ),
    )
    # Buffered (asynchronous) rounds, FedBuff (Nguyen et al. 2022): docs/cloud_server.md,
    # "Buffered aggregation"; a=0.5 and K=10 are the paper's choices.
    aggregation_mode: str = field(
        default=SYNC,
        metadata=opt(
            "sync: each round waits for its selected devices (or --round-timeout); buffered: "
            "devices train continuously and every --buffer-size updates make a round, so slow "
            "devices hold no one up (docs/cloud_server.md, Buffered aggregation).",
            choices=AGGREGATION_MODES,
        ),
    )
    buffer_size: int = field(
        default=10,
        metadata=opt("buffered: K; once K updates wait, they (and any more by then) make a round."),
    )
    staleness_exponent: float = field(
        default=0.5,
        metadata=opt(
            "buffered: an update that trained from a model s rounds old counts (1 + s)^-a times "
            "its change; 0 counts every update fully."
        ),
    )
    max_staleness: int = field(
        default=10,
        metadata=opt(
            "buffered: refuse (as late) an update that trained from a model more rounds old."
        ),
    )

    def __post_init__(self) -> None:
        self.aggregation_config()  # raises ValueError naming a bad bound or rule
        if self.encoding not in ENCODINGS or self.encoding_down not in DOWN_ENCODINGS:
            raise ValueError(
                f"encoding must be one of {ENCODINGS} and encoding_down one of "
                f"{DOWN_ENCODINGS}, got {self.encoding!r} and {self.encoding_down!r}"
            )
        if isinstance(self.max_refusals, bool) or not isinstance(self.max_refusals, int):
            raise ValueError(f"max_refusals must be an integer, got {self.max_refusals!r}")
        if self.max_refusals < 1:
            raise ValueError(f"max_refusals must be >= 1, got {self.max_refusals!r}")
        self._check_buffered()
        self.settings(deadline=0.0)  # ProtocolError (a ValueError) names a bad round setting

    def _check_buffered(self) -> None:
        """Raise ValueError naming a bad option of the buffered mode."""
        if self.aggregation_mode not in AGGREGATION_MODES:
            raise ValueError(
                f"aggregation_mode must be one of {list(AGGREGATION_MODES)}, "
                f"got {self.aggregation_mode!r}"
            )
        for name, least in (("buffer_size", 1), ("max_staleness", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        exponent = self.staleness_exponent
        if not (isinstance(exponent, (int, float)) and math.isfinite(exponent) and exponent >= 0):
            raise ValueError(f"staleness_exponent must be finite and >= 0, got {exponent!r}")

    def aggregation_config(self) -> AggregationConfig:
        return AggregationConfig(
            rule=self.aggregation,
            trim_fraction=self.trim_fraction,
            clip_norm=self.clip_norm,
            max_update_norm=self.max_update_norm,
            max_samples=self.max_samples,
            max_global_growth=self.max_global_growth,
            server_lr=self.server_lr,
        )

    @property
    def down_encoding(self) -> str:
        """What BODY_OUT and GRAD_H travel in: `encoding_down`, or `encoding` for same."""
        return self.encoding if self.encoding_down == SAME_ENCODING else self.encoding_down

    def settings(self, deadline: float) -> PhaseSettings:
        return PhaseSettings(
            keep_ratio=self.keep_ratio,
            local_epochs=self.local_epochs,
            local_lr=self.local_lr,
            split_lr=self.split_lr,
            deadline=deadline,
            split_epochs=self.split_epochs,
            batch_size=self.batch_size,
            encoding=self.encoding,
            prune=self.prune,
            defense_clip=self.defense_clip,
            defense_noise=self.defense_noise,
            defense_grad_noise=self.defense_grad_noise,
            defense_grad_max_norm=self.defense_grad_max_norm,
        )


def params_digest(params: Params) -> str:
    """A short fingerprint of weights, logged so that a resumed run can be checked."""
    digest = hashlib.sha256()
    for key in sorted(params):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(params[key]).tobytes())
    return digest.hexdigest()[:16]


def devices_per_round(cfg: RoundConfig, online: int) -> int:
    """How many of `online` devices train at once: a count, or a fraction (at least one)."""
    if cfg.clients_per_round is not None:
        count = cfg.clients_per_round
    else:
        count = math.ceil(cfg.fraction * online)
    return max(1, min(count, online))


def select_devices(
    online: list[str], cfg: RoundConfig, rng: np.random.Generator, count: int | None = None
) -> list[str]:
    """A random subset of the online devices: `count` of them, by default
    `devices_per_round`."""
    count = devices_per_round(cfg, len(online)) if count is None else min(count, len(online))
    chosen = rng.choice(len(online), size=count, replace=False)
    return sorted(online[i] for i in chosen)
