"""`EdgeConfig`: every option of `sfprompt-edge start`, with its default and help.

The options `start` and `profile` share (how the device runs its graphs) are defined once, by
the `*_field` functions that both `EdgeConfig` and `ProfileConfig` use (sfprompt/options.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.broker_login import BrokerLogin
from sfprompt.options import internal, opt

from .defenses import DefenseFloor
from .runtime import RUNTIMES


def runtime_field() -> Any:
    return field(
        default="onnx",
        metadata=opt(
            "onnx needs no PyTorch; torchscript for devices that have it (Jetson).",
            choices=RUNTIMES,
        ),
    )


def threads_field() -> Any:
    return field(default=None, metadata=opt("Compute threads (default: up to 4 cores)."))


def micro_batch_field() -> Any:
    return field(
        default=4,
        metadata=opt(
            "Samples the head graphs process at once, and (keeping the tape) samples per split "
            "exchange with the server; smaller uses less memory, larger is faster."
        ),
    )


def lean_field() -> Any:
    return field(
        default=False,
        metadata=opt(
            "Least memory instead of most speed (onnx runtime): the head's backward recomputes "
            "its forward instead of keeping its activations (~7.8 MB per ViT-Base sample per "
            "head block) and no memory arena is kept; about half the step speed."
        ),
    )


def memory_budget_field() -> Any:
    return field(
        default=None,
        metadata=opt(
            "Peak MB allowed: picks the largest micro-batch that fits, or refuses.",
            flag="--memory-budget",
        ),
    )


@dataclass(frozen=True)
class EdgeConfig:
    """Everything `sfprompt-edge start` takes; `--config FILE` fills the same fields."""

    bundle: Path = field(
        metadata=opt(
            "The device bundle folder (sfprompt-export bundle).", exists=True, file_okay=False
        )
    )
    data: Path = field(
        metadata=opt(
            "Local images: an ImageFolder directory, CIFAR-10/100 binary batches or an .npz.",
            exists=True,
        )
    )
    device_id: str = field(metadata=opt("This device's id, also its broker user name."))
    broker: str = field(
        default="mqtt://127.0.0.1:1883",
        metadata=opt("mqtt://host:port or mqtts://host:port (user:password@ allowed)."),
    )
    login: BrokerLogin = field(default_factory=BrokerLogin)
    runtime: str = runtime_field()
    data_split: str = field(
        default="train",
        metadata=opt("Which split of a CIFAR folder or train/test .npz pair to use."),
    )
    threads: int | None = threads_field()
    micro_batch: int | None = micro_batch_field()
    lean: bool = lean_field()
    memory_budget_mb: float | None = memory_budget_field()
    momentum: float = field(default=0.0, metadata=opt("SGD momentum."))
    weight_decay: float = field(default=0.0, metadata=opt("SGD weight decay."))
    request_timeout_s: float = field(  # per split exchange, split into `attempts` sends
        default=60.0,
        metadata=opt("Seconds to wait for the server in split training.", flag="--request-timeout"),
    )
    attempts: int = field(default=3, metadata=internal())
    seed: int = field(
        default=0, metadata=opt("Seed of this device's batch order (mixed with its id).")
    )
    max_rounds: int | None = field(
        default=None, metadata=opt("Leave after this many rounds (default: until stopped).")
    )
    leave_when_server_stops: bool = field(
        default=False, metadata=opt("Leave once the server says the federation has finished.")
    )
    step_delay_s: float = field(
        default=0.0,
        metadata=opt(
            "For tests and demos: wait this long in every training batch, to play a slow "
            "device (a straggler); in a split batch the wait falls between the body's output "
            "and the gradient sent back, where a device computes its tail.",
            flag="--step-delay",
        ),
    )
    # The least defense against a curious server this device accepts (edge_client/defenses.py):
    # a round whose TASK asks for less is sat out and the server told why.
    require_noise: float = field(
        default=0.0,
        metadata=opt(
            "Sit out rounds whose TASK adds less noise than this to h (sigma, as serve's "
            "--defense-noise; 0: accept any). The server chooses the defense; this is the "
            "device's own floor against one that asks for none."
        ),
    )
    require_grad_noise: float = field(
        default=0.0,
        metadata=opt("Sit out rounds whose TASK adds less noise than this to dL/dz (K)."),
    )
    require_grad_max_norm: bool = field(
        default=False, metadata=opt("Sit out rounds whose TASK has no max-norm noise on dL/dz.")
    )

    def __post_init__(self) -> None:
        self.defense_floor()  # raises ValueError naming a bad --require-* value

    def defense_floor(self) -> DefenseFloor:
        return DefenseFloor(self.require_noise, self.require_grad_noise, self.require_grad_max_norm)
