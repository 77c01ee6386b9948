"""The encodings sweep: SFPrompt once per encoding of activations and gradients, against fp32.

A setting is one encoding for both directions ("int8") or UP/DOWN ("int8/fp16": h and dL/dz go up
in int8, z and dL/dh come down in fp16, serve's `--encoding-down`). Every setting runs on the
comparison's partitions and seeds (the same shards), so a row's accuracy differs from fp32's by
the encoding alone, up to the noise the seeds show. Each row also gives the bytes it measured and
what the same setting costs at the paper's ViT-Base scale, as a ratio to FL full fine-tuning
(`paper_scale.py`: 0.466x in fp32).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sfprompt.protocol.messages import ENCODINGS
from sfprompt.units import MB

from .results import MethodResult, partition_label

REFERENCE = "fp32"  # the setting every other is compared with; the sweep always runs it


@dataclass(frozen=True)
class Setting:
    """How activations and gradients travel: `up` (SMASHED, GRAD_Z), `down` (BODY_OUT, GRAD_H)."""

    up: str
    down: str

    @classmethod
    def parse(cls, text: str) -> Setting:
        """From "fp16" (both ways) or "int8/fp16" (up/down); raises ValueError naming a bad one."""
        up, pair, down = text.strip().partition("/")
        down = down if pair else up
        for name in (up, down):
            if name not in ENCODINGS:
                raise ValueError(
                    f"unknown encoding setting {text!r}: one of {', '.join(ENCODINGS)}, or "
                    "UP/DOWN such as int8/fp16"
                )
        return cls(up, down)

    @property
    def name(self) -> str:
        return self.up if self.up == self.down else f"{self.up}/{self.down}"


def sweep_settings(texts: Sequence[str]) -> list[Setting]:
    """The settings to run, fp32 first (the reference), each once, in the order given."""
    settings = [Setting(REFERENCE, REFERENCE)] + [Setting.parse(t) for t in texts]
    return list(dict.fromkeys(settings))


@dataclass
class EncodingRun:
    """SFPrompt's result in one setting, partition and seed."""

    setting: str  # Setting.name
    partition: str
    seed: int
    result: MethodResult


@dataclass(frozen=True)
class EncodingRow:
    """One setting in one partition, over its seeds; accuracies are fractions, bytes MB."""

    setting: str
    partition: str
    seeds: int
    final_mean: float
    final_std: float  # sample std over seeds (0 with one seed)
    delta_points: float  # final_mean - fp32's, in accuracy points
    delta_noise: float  # hypot of both stds, in points: a |delta| below it is noise
    mb_per_round: float  # measured, per device, up + down (TASK and UPDATE included)
    mb_up: float
    mb_down: float
    bytes_vs_fp32: float  # measured bytes per round / fp32's
    vit_base_mb: float  # SFPrompt per device and round at the paper's ViT-Base scale
    vit_base_vs_fl_full: float  # that / FL full fine-tuning's (0.466 in fp32)


def encoding_rows(
    runs: Sequence[EncodingRun], vit_base: Mapping[str, tuple[float, float]]
) -> list[EncodingRow]:
    """One row per (partition, setting), in the order they ran; `vit_base` maps a setting's name
    to (bytes per round, ratio to FL full) at ViT-Base scale. Raises ValueError without fp32."""
    groups: dict[tuple[str, str], list[MethodResult]] = {}
    for run in runs:
        groups.setdefault((run.partition, run.setting), []).append(run.result)
    rows = []
    for (partition, setting), results in groups.items():
        reference = groups.get((partition, REFERENCE))
        if reference is None:
            raise ValueError(f"encodings: no {REFERENCE} run in {partition} to compare with")
        mean, std = _final(results)
        ref_mean, ref_std = _final(reference)
        mb = _bytes(results)
        vit_bytes, vit_ratio = vit_base.get(setting, (float("nan"), float("nan")))
        rows.append(
            EncodingRow(
                setting=setting,
                partition=partition,
                seeds=len(results),
                final_mean=mean,
                final_std=std,
                delta_points=100 * (mean - ref_mean),
                delta_noise=100 * float(np.hypot(std, ref_std)),
                mb_per_round=mb[0],
                mb_up=mb[1],
                mb_down=mb[2],
                bytes_vs_fp32=mb[0] / _bytes(reference)[0],
                vit_base_mb=vit_bytes / MB,
                vit_base_vs_fl_full=vit_ratio,
            )
        )
    return rows


def _final(results: Sequence[MethodResult]) -> tuple[float, float]:
    finals = np.array([r.final_accuracy for r in results])
    return float(finals.mean()), float(finals.std(ddof=1)) if len(finals) > 1 else 0.0


def _bytes(results: Sequence[MethodResult]) -> tuple[float, float, float]:
    """(up + down, up, down) in MB per device and round, means over rounds and seeds."""
    up = np.mean([np.mean([r.bytes_up for r in m.rounds]) for m in results]) / MB
    down = np.mean([np.mean([r.bytes_down for r in m.rounds]) for m in results]) / MB
    return float(up + down), float(up), float(down)


def _delta(row: EncodingRow) -> str:
    if row.setting == REFERENCE:
        return "reference"
    noise = f"noise {row.delta_noise:.1f}" if row.seeds > 1 else "1 seed"
    return f"{row.delta_points:+.1f} ({noise})"


# (header, cell) of each column; the Markdown and the console table share them.
COLUMNS: list[tuple[str, Callable[[EncodingRow], str]]] = [
    ("Partition", lambda r: partition_label(r.partition)),
    ("Encoding (up/down)", lambda r: r.setting),
    ("Seeds", lambda r: str(r.seeds)),
    ("Final acc. (%)", lambda r: f"{100 * r.final_mean:.1f} ± {100 * r.final_std:.1f}"),
    ("vs fp32 (points)", lambda r: _delta(r)),
    ("MB/round/device", lambda r: f"{r.mb_per_round:.3g}"),
    ("Up / down MB", lambda r: f"{r.mb_up:.3g} / {r.mb_down:.3g}"),
    ("Bytes vs fp32", lambda r: f"{r.bytes_vs_fp32:.2f}x"),
    ("ViT-Base MB/round", lambda r: f"{r.vit_base_mb:,.1f}"),
    ("ViT-Base vs FL full", lambda r: f"{r.vit_base_vs_fl_full:.3f}x"),
]


def markdown(rows: Sequence[EncodingRow], scale: str) -> str:
    """The report's section: the table and how to read it."""
    lines = [
        "## Encodings of activations and gradients",
        "",
        "SFPrompt once per encoding setting (UP/DOWN: h and dL/dz up, z and dL/dh down), on the "
        "same partitions, seeds and shards as fp32. Final accuracy (%), mean ± sample std over "
        "seeds; vs fp32: the difference of means in points, and the combined std (a difference "
        "below it is noise). MB per device and round as measured on the wire (TASK and UPDATE "
        f"included). ViT-Base: the same setting counted by sim/comm_model.py at {scale}, and its "
        "ratio to FL full fine-tuning (0.466x in fp32, docs/simulation.md).",
        "",
        "| " + " | ".join(header for header, _ in COLUMNS) + " |",
        "|" + "|".join([":---", ":---"] + ["---:"] * (len(COLUMNS) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_encodings(rows: Sequence[EncodingRow], console: Console) -> None:
    table = Table(title="Encodings: SFPrompt's final accuracy and bytes, against fp32")
    for index, (header, _) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*(cell(row) for _, cell in COLUMNS))
    console.print(table)


def write_encodings(
    folder: Path, rows: Sequence[EncodingRow], runs: Sequence[EncodingRun], scale: str
) -> list[Path]:
    """encodings.md, encodings.json (every run's curve too) and encodings.csv (the rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "encodings.md"
    md.write_text(markdown(rows, scale))
    data = {
        "rows": [asdict(r) for r in rows],
        "vit_base_setting": scale,
        "runs": [
            {
                "setting": r.setting,
                "partition": r.partition,
                "seed": r.seed,
                "result": r.result.to_dict(),
            }
            for r in runs
        ],  # fmt: skip
    }
    js = folder / "encodings.json"
    js.write_text(json.dumps(data, indent=1))
    table = folder / "encodings.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(EncodingRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    return [md, js, table]
