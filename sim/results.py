"""What every method of a simulation produces, in one shape, so the report treats them alike."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METHODS = (
    "sfprompt",
    "sfprompt_global_prune",
    "sfprompt_no_prune",
    "sfprompt_no_local",
    "sfl",
    "sfl_linear",
    "fl_full",
    "fl_prompt",
)
LABELS = {
    "sfprompt": "SFPrompt",
    "sfprompt_global_prune": "SFPrompt, EL2N over all classes (paper)",
    "sfprompt_no_prune": "SFPrompt w/o pruning",
    "sfprompt_no_local": "SFPrompt w/o local loss",
    "sfl": "SFL",
    "sfl_linear": "SFL+Linear",
    "fl_full": "FL full fine-tuning",
    "fl_prompt": "FL prompt tuning",
}
SPLIT_METHODS = tuple(m for m in METHODS if not m.startswith("fl_"))  # a server holds a body


@dataclass
class RoundRecord:
    """One round of one method; bytes and costs are per participating device (means)."""

    round: int
    accuracy: float  # on the test set after the round's aggregation
    loss: float
    bytes_up: float  # device -> server, per device, this round
    bytes_down: float  # server -> device, per device, this round
    device_flops: float  # FLOPs one device spent this round (training and scoring)
    device_peak_mb: float  # peak memory of one device this round (measured RSS or estimate)
    seconds: float  # measured wall time of the round in this simulation
    est_round_minutes: float = 0.0  # estimated at the given links and compute (docs/simulation.md)
    measured: dict[str, bool] = field(default_factory=dict)  # e.g. {"bytes": True, "memory": False}


@dataclass
class MethodResult:
    method: str  # one of METHODS
    clients: int
    rounds: list[RoundRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "bytes measured on the wire"

    @property
    def label(self) -> str:
        return LABELS.get(self.method, self.method)

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    @property
    def bytes_per_round(self) -> float:
        """Mean bytes up + down per device per round."""
        if not self.rounds:
            return float("nan")
        return float(np.mean([r.bytes_up + r.bytes_down for r in self.rounds]))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "label": self.label, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        rounds = [RoundRecord(**r) for r in data["rounds"]]
        return cls(data["method"], data["clients"], rounds, list(data.get("notes", [])))


@dataclass
class Features:
    """What the tail reads for a set of test images, for a t-SNE plot (appendix Figures 3-6)."""

    name: str  # "untuned", "fl_full", "sfl_linear", "sfprompt"
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64


def partition_label(spec: str) -> str:
    """A partition's name in a table: "iid" -> IID, "dirichlet:0.1" -> Dirichlet alpha=0.1."""
    return "IID" if spec == "iid" else f"Dirichlet alpha={spec.split(':', 1)[1]}"


def save_results(results: list[MethodResult], path: Path) -> None:
    path.write_text(json.dumps([r.to_dict() for r in results], indent=2))


def load_results(path: Path) -> list[MethodResult]:
    return [MethodResult.from_dict(d) for d in json.loads(path.read_text())]


def fmt_number(value: float | None) -> str:
    """Three significant figures or so, without scientific notation for everyday sizes."""
    if value is None or not math.isfinite(value):
        return "n/a"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 0.1 or size == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"
