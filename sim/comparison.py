"""The main job's verdict: every method over several seeds in each partition, next to its ceilings.

One federated run is one seed of one method in one partition (`SeedRun`); this module reduces
them to mean ± standard deviation of the final accuracy (sample std, ddof=1, over seeds), draws
the accuracy curves with ±1 std bands, and writes `comparison.md` / `comparison.json`, so a
reader sees at once whether a gap is larger than the noise between seeds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from sfprompt.units import MB

from .ceilings import Ceiling
from .results import LABELS, MethodResult, partition_label


@dataclass
class SeedRun:
    """Every method's result for one partition and seed."""

    partition: str  # e.g. "iid", "dirichlet:0.1"
    seed: int
    results: list[MethodResult]


@dataclass(frozen=True)
class Row:
    partition: str
    method: str
    label: str
    seeds: int
    final_mean: float  # fraction in [0, 1]
    final_std: float  # sample std over seeds (0 with one seed)
    best_mean: float
    mb_per_round: float  # per device, up + down, mean over rounds and seeds


def comparison_rows(runs: Sequence[SeedRun]) -> list[Row]:
    """One row per (partition, method), in the order they ran."""
    groups: dict[tuple[str, str], list[MethodResult]] = {}
    for run in runs:
        for result in run.results:
            groups.setdefault((run.partition, result.method), []).append(result)
    rows = []
    for (partition, method), results in groups.items():
        finals = np.array([r.final_accuracy for r in results])
        bests = [max(x.accuracy for x in r.rounds) for r in results if r.rounds]
        rows.append(
            Row(
                partition,
                method,
                LABELS.get(method, method),
                len(results),
                float(np.mean(finals)),
                float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
                float(np.mean(bests)) if bests else float("nan"),
                float(np.mean([r.bytes_per_round for r in results])) / MB,
            )
        )
    return rows


def gaps(rows: Sequence[Row], main: str = "sfprompt") -> list[str]:
    """Sentences: the main method's gap to every other method in each partition, in points,
    with the combined std so a reader can tell a gap from noise."""
    by_key = {(r.partition, r.method): r for r in rows}
    out = []
    for row in rows:
        ref = by_key.get((row.partition, main))
        if ref is None or row.method == main:
            continue
        gap = 100 * (ref.final_mean - row.final_mean)
        noise = 100 * float(np.hypot(ref.final_std, row.final_std))
        verdict = "within the noise" if abs(gap) <= noise else ("ahead" if gap > 0 else "behind")
        out.append(
            f"{partition_label(row.partition)}: {ref.label} {gap:+.1f} points vs {row.label} "
            f"(combined std {noise:.1f}: {verdict})"
        )
    return out


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def markdown(
    rows: Sequence[Row],
    ceilings: Sequence[Ceiling],
    settings: dict[str, Any],
    extra: str = "",
) -> str:
    """comparison.md; `extra`: more sections (Markdown) before the gaps, e.g. the encodings."""
    lines = [
        "# The comparison: mean ± std over seeds",
        "",
        "Final accuracy (%) after the last round on the server's test set, mean ± sample std "
        "over the seeds (a seed changes the partition, the data order and device sampling; the "
        "initial prompt and tail are the same export). MB per device and round, up + down.",
        "",
        "| Partition | Method | Seeds | Final acc. (%) | Best acc. (%) | MB/round/device |",
        "|:---|:---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {partition_label(r.partition)} | {r.label} | {r.seeds} | "
        f"{_pm(r.final_mean, r.final_std)} | {100 * r.best_mean:.1f} | {r.mb_per_round:.3g} |"
        for r in rows
    ]
    if ceilings:
        lines += ["", "## Ceilings: the same backbone trained centrally on all devices' data", ""]
        lines += ["| Ceiling | Accuracy (%) | Epochs | Training images |", "|:---|---:|---:|---:|"]
        lines += [
            f"| {c.label} | {100 * c.accuracy:.1f} | {c.epochs} | {c.train_samples} |"
            for c in ceilings
        ]
    if extra:
        lines += ["", extra.rstrip("\n")]
    lines += ["", "## Gaps", "", *[f"- {s}" for s in gaps(rows)], "", "## Settings", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def print_comparison(rows: Sequence[Row], ceilings: Sequence[Ceiling], console: Console) -> None:
    table = Table(title="Final accuracy, mean ± std over seeds")
    for header in ("Partition", "Method", "Seeds", "Final acc. (%)", "Best (%)", "MB/round/dev"):
        table.add_column(header, justify="left" if header in ("Partition", "Method") else "right")
    for r in rows:
        table.add_row(
            partition_label(r.partition), r.label, str(r.seeds),
            _pm(r.final_mean, r.final_std), f"{100 * r.best_mean:.1f}", f"{r.mb_per_round:.3g}",
        )  # fmt: skip
    for c in ceilings:
        table.add_row("centralised", c.label, "1", f"{100 * c.accuracy:.1f}", "", "")
    console.print(table)


def plot_bands(runs: Sequence[SeedRun], ceilings: Sequence[Ceiling], path: Path) -> Path:
    """Accuracy per round, mean line and ±1 std band over seeds, one panel per partition;
    the ceilings as dashed lines."""
    from .plots import _style

    partitions = list(dict.fromkeys(r.partition for r in runs))
    fig = Figure(figsize=(5 * len(partitions) + 2, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(partitions), sharey=True))
    methods = list(dict.fromkeys(m.method for r in runs for m in r.results))
    styles = _style(methods)
    for ax, partition in zip(axes, partitions):
        for method in methods:
            curves = [
                [100 * x.accuracy for x in m.rounds]
                for r in runs
                if r.partition == partition
                for m in r.results
                if m.method == method
            ]
            length = min(len(c) for c in curves)
            acc = np.array([c[:length] for c in curves])
            rounds = np.arange(1, length + 1)
            mean, std = acc.mean(0), acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(length)
            color = styles[method]["color"]
            width = styles[method].get("linewidth", 1.5)
            ax.plot(rounds, mean, color=color, marker=styles[method]["marker"],
                    label=LABELS.get(method, method), linewidth=width)  # fmt: skip
            ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.18)
        for index, ceiling in enumerate(ceilings):
            ax.axhline(100 * ceiling.accuracy, color="grey", linestyle=("--", ":", "-.")[index % 3],
                       linewidth=1, label=ceiling.label)  # fmt: skip
        ax.set_title(partition_label(partition))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center")
    fig.savefig(path, dpi=120)
    return path


def write_comparison(
    folder: Path,
    runs: Sequence[SeedRun],
    ceilings: Sequence[Ceiling],
    settings: dict[str, Any],
    extra: str = "",
) -> list[Path]:
    """comparison.md (with the sections `extra`), comparison.json (every seed's curve too) and
    accuracy_bands.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(runs)
    md = folder / "comparison.md"
    md.write_text(markdown(rows, ceilings, settings, extra))
    data = {
        "rows": [asdict(r) for r in rows],
        "ceilings": [asdict(c) for c in ceilings],
        "runs": [
            {"partition": r.partition, "seed": r.seed, "results": [m.to_dict() for m in r.results]}
            for r in runs
        ],
        "settings": settings,
    }
    js = folder / "comparison.json"
    js.write_text(json.dumps(data, indent=1))
    return [md, js, plot_bands(runs, ceilings, folder / "accuracy_bands.png")]
