"""The simulator's report: metrics files, plots and a summary comparing the methods.

Every method is judged as the paper judges it, per participating device and per round (bytes up
and down, device FLOPs, device peak memory, estimated round time), next to its accuracy, so that
"SFPrompt reached X% using Z x the bytes of FL full fine-tuning" can be read off one table.
Accuracies are fractions in [0, 1] (shown as %); bytes are shown in MB = 10^6 bytes.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sfprompt.units import MB

from .plots import plot_accuracy, plot_bars, plot_clients_sweep
from .results import Features, MethodResult, RoundRecord, fmt_number, save_results
from .tsne import tsne_panels

GFLOP = 1e9
# RoundRecord.measured keys behind each costed column; a False there marks the value estimated.
MEASURED_KEYS = {
    "bytes": ("mb_per_round", "mb_up", "mb_down"),
    "flops": ("device_gflop",),
    "memory": ("device_peak_mb",),
}
MIXED = "measured in some rounds only"


@dataclass(frozen=True)
class Report:
    summary_markdown: str
    files: list[Path]


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def _measured_status(result: MethodResult) -> dict[str, str]:
    """Per RoundRecord.measured key: measured or estimated in every round, or only in some."""
    seen: dict[str, set[bool]] = {}
    for record in result.rounds:
        for key, flag in record.measured.items():
            seen.setdefault(key, set()).add(bool(flag))
    names = {frozenset({True}): "measured", frozenset({False}): "estimated"}
    return {key: names.get(frozenset(flags), MIXED) for key, flags in seen.items()}


def _check_results(results: Sequence[MethodResult]) -> None:
    """Raise ValueError when the results cannot be compared fairly or read as fractions."""
    if not results:
        raise ValueError("report: no method results given")
    methods = [r.method for r in results]
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise ValueError(f"report: each method may appear once, got duplicates {duplicates}")
    for result in results:
        for record in result.rounds:
            if math.isfinite(record.accuracy) and not 0.0 <= record.accuracy <= 1.0:
                raise ValueError(
                    f"report: {result.method} round {record.round}: accuracy must be a fraction "
                    f"in [0, 1], got {record.accuracy}"
                )


def summary_table(results: Sequence[MethodResult]) -> list[dict[str, Any]]:
    """One row per method: accuracies (fractions), per-device costs per round, byte ratios.

    Costs are means over rounds, except peak memory (maximum over rounds). A value that does not
    apply (no rounds, no SFL or FL full run to compare with, no time estimate) is None.
    Raises ValueError for no results, a method given twice, or an accuracy outside [0, 1].
    """
    _check_results(results)
    by_method = {r.method: r for r in results}

    def bytes_of(method: str) -> float | None:
        result = by_method.get(method)
        return _mean([r.bytes_up + r.bytes_down for r in result.rounds]) if result else None

    rows = []
    for result in results:
        rounds = result.rounds
        total = bytes_of(result.method)
        peak = [r.device_peak_mb for r in rounds if math.isfinite(r.device_peak_mb)]
        est = [r.est_round_minutes for r in rounds if r.est_round_minutes > 0]
        status = _measured_status(result)
        rows.append(
            {
                "method": result.method,
                "label": result.label,
                "clients": result.clients,
                "rounds": len(rounds),
                "final_accuracy": _mean([rounds[-1].accuracy]) if rounds else None,
                "best_accuracy": max(
                    (r.accuracy for r in rounds if math.isfinite(r.accuracy)), default=None
                ),
                "mb_per_round": None if total is None else total / MB,
                "mb_up": _scaled(_mean([r.bytes_up for r in rounds]), MB),
                "mb_down": _scaled(_mean([r.bytes_down for r in rounds]), MB),
                "bytes_vs_sfl": _ratio(total, bytes_of("sfl")),
                "bytes_vs_fl_full": _ratio(total, bytes_of("fl_full")),
                "device_gflop": _scaled(_mean([r.device_flops for r in rounds]), GFLOP),
                "device_peak_mb": max(peak) if peak else None,
                "est_round_minutes": float(np.mean(est)) if est else None,
                "sim_seconds_per_round": _mean([r.seconds for r in rounds]),
                "estimated": sorted(
                    col
                    for key, cols in MEASURED_KEYS.items()
                    if status.get(key) in ("estimated", MIXED)
                    for col in cols
                ),
            }
        )
    return rows


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit


def fmt_ratio(value: float | None) -> str:
    """Two decimals for everyday ratios (0.30x), two significant figures for tiny ones."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}x" if 0.1 <= value < 10 else f"{fmt_number(value)}x"


def fmt_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _percent_text(value: float | None) -> str:
    return "n/a" if value is None else f"{fmt_percent(value)}%"


# (row key, column header, formatter); the Markdown and the console table share it.
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("label", "Method", str),
    ("final_accuracy", "Final acc. (%)", fmt_percent),
    ("best_accuracy", "Best acc. (%)", fmt_percent),
    ("mb_per_round", "MB/round/device (up+down)", fmt_number),
    ("mb_up", "Up MB", fmt_number),
    ("mb_down", "Down MB", fmt_number),
    ("bytes_vs_sfl", "Bytes vs SFL", fmt_ratio),
    ("bytes_vs_fl_full", "Bytes vs FL full", fmt_ratio),
    ("device_gflop", "Device GFLOP/round", fmt_number),
    ("device_peak_mb", "Device peak MB", fmt_number),
    ("est_round_minutes", "Est. round (min)", fmt_number),
    ("sim_seconds_per_round", "Sim. s/round", fmt_number),
]


def _cells(row: dict[str, Any]) -> list[str]:
    """A row as text; values marked estimated by RoundRecord.measured get a '*'."""
    return [
        fmt(row[key]) + ("*" if key in row["estimated"] and row[key] is not None else "")
        for key, _, fmt in COLUMNS
    ]


def print_summary(results: Sequence[MethodResult], console: Console) -> None:
    """Print the summary rows as a rich Table (same columns as summary.md)."""
    table = Table(title="SFPrompt simulation: per device, per round", caption="* estimated")
    for index, (_, header, _) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in summary_table(results):
        table.add_row(*_cells(row))
    console.print(table)


def _primary(results: Sequence[MethodResult]) -> MethodResult:
    """The method the findings are about: SFPrompt if it ran, else an ablation, else the first."""
    ranked = [r for r in results if r.method == "sfprompt"]
    ranked += [r for r in results if r.method.startswith("sfprompt")]
    return (ranked or list(results))[0]


def findings(results: Sequence[MethodResult], rows: list[dict[str, Any]]) -> list[str]:
    """Sentences comparing the primary method with every other one; estimated costs say so."""
    by_method = {row["method"]: row for row in rows}
    main = by_method[_primary(results).method]
    sentences = []
    for other in rows:
        if other is main:
            continue
        if not other["rounds"]:
            sentences.append(f"{other['label']} completed no round.")
            continue
        costs = [
            f"{fmt_ratio(_ratio(main[key], other[key]))} its {what}"
            + (" (estimated)" if key in main["estimated"] + other["estimated"] else "")
            for key, what in (
                ("mb_per_round", "bytes per round"),
                ("device_gflop", "device FLOPs per round"),
                ("device_peak_mb", "device peak memory"),
            )
            if _ratio(main[key], other[key]) is not None
        ]
        text = (
            f"{main['label']} reached {_percent_text(main['final_accuracy'])} vs "
            f"{other['label']} {_percent_text(other['final_accuracy'])}"
        )
        if costs:
            text += " using " + ", ".join(costs[:-1]) + (" and " if costs[:-1] else "") + costs[-1]
        if main["est_round_minutes"] is not None and other["est_round_minutes"] is not None:
            text += (
                f"; estimated round time {fmt_number(main['est_round_minutes'])} vs "
                f"{fmt_number(other['est_round_minutes'])} min"
            )
        sentences.append(text + ".")
    return sentences


def _provenance(results: Sequence[MethodResult]) -> list[str]:
    lines = []
    for result in results:
        status = _measured_status(result)
        groups = {
            s: [k for k, v in sorted(status.items()) if v == s]
            for s in ("measured", "estimated", MIXED)
        }
        parts = [f"{s}: {', '.join(keys)}" for s, keys in groups.items() if keys]
        text = "; ".join(parts) if parts else "not recorded"
        notes = "".join(f" Note: {n}" + ("" if n.endswith(".") else ".") for n in result.notes)
        lines.append(f"- {result.label}: {text}.{notes}")
    return lines


def summary_markdown(
    results: Sequence[MethodResult],
    settings: dict[str, Any] | None,
    files: Sequence[Path],
    sections: Sequence[str] = (),
) -> str:
    """The text of summary.md: table, findings, `sections` (Markdown from other stages, such as
    the leakage audit's), what is measured vs estimated, settings."""
    rows = summary_table(results)
    clients = sorted({r.clients for r in results})
    rounds = sorted({len(r.rounds) for r in results})
    lines = [
        "# SFPrompt simulation report",
        "",
        f"{len(results)} methods, {'/'.join(map(str, clients))} clients, "
        f"{'/'.join(map(str, rounds))} rounds. Bytes, FLOPs and memory are per participating "
        "device: bytes and FLOPs are means over rounds, peak memory the maximum over rounds. "
        "1 MB = 10^6 bytes. Byte ratios divide a method's bytes per round by SFL's or FL full "
        "fine-tuning's (n/a when that method did not run).",
        "",
        "| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    lines += ["", "\\* estimated, not measured (RoundRecord.measured says so in some round).", ""]
    lines += ["## Findings", ""] + [f"- {s}" for s in findings(results, rows)] + [""]
    lines += [section.rstrip("\n") + "\n" for section in sections]
    lines += [
        "## Measured and estimated",
        "",
        "Accuracy and loss are measured on the server's test set after each round's aggregation. "
        "Sim. s/round is the measured wall time of a round in this simulation, with every process "
        "sharing one machine. Est. round (min) is always an estimate, at the links and compute "
        "given in the settings (n/a where none was made). Per method, from RoundRecord.measured:",
        "",
        *_provenance(results),
        "",
        "## Settings",
        "",
    ]
    settings = settings or {}
    lines += [f"- {k}: {_setting(v)}" for k, v in settings.items()] or ["- (none given)"]
    lines += ["", "## Files", ""] + [f"- {p.name}" for p in files] + [""]
    return "\n".join(lines)


def _setting(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def write_metrics_csv(results: Sequence[MethodResult], path: Path) -> Path:
    """One row per method x round with every RoundRecord field; `measured` as measured.<key>."""
    base = ["method", "label", "clients"] + [f.name for f in fields(RoundRecord)]
    rows = []
    for result in results:
        for record in result.rounds:
            row: dict[str, Any] = {
                "method": result.method,
                "label": result.label,
                "clients": result.clients,
            }
            for name, value in asdict(record).items():
                if isinstance(value, dict):
                    row.update({f"{name}.{k}": v for k, v in value.items()})
                else:
                    row[name] = value
            rows.append(row)
    extra = sorted({k for row in rows for k in row} - set(base))
    columns = [c for c in base if c != "measured"] + extra
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(
    out: Path,
    results: list[MethodResult],
    features: Sequence[Features] = (),
    sweep: dict[int, list[MethodResult]] | None = None,
    settings: dict[str, Any] | None = None,
    sections: Sequence[str] = (),
    extra_files: Sequence[Path] = (),
) -> Report:
    """Write results.json, metrics.csv, the plots and summary.md into `out` (created if needed).

    clients_sweep.png only when `sweep` is given, tsne.png only when `features` are. `sections`
    go into summary.md after the findings; `extra_files`, already written, are listed with it.
    Raises ValueError for results the summary cannot compare (see `summary_table`).
    """

    rows = summary_table(results)
    for run in (sweep or {}).values():
        _check_results(run)
    out.mkdir(parents=True, exist_ok=True)
    save_results(list(results), out / "results.json")
    files = [out / "results.json", write_metrics_csv(results, out / "metrics.csv")]
    files.append(plot_accuracy(results, out / "accuracy.png"))
    files.append(plot_accuracy(results, out / "accuracy_vs_bytes.png", by_bytes=True))
    memory = ("Device peak memory", "peak memory of one device (MB)")
    files.append(plot_bars(rows, "device_peak_mb", out / "memory.png", *memory))
    time = ("Estimated time of one round", "minutes per round (at the settings' links, compute)")
    files.append(plot_bars(rows, "est_round_minutes", out / "time.png", *time))
    if sweep:
        files.append(plot_clients_sweep(sweep, out / "clients_sweep.png"))
    if features:
        files.append(tsne_panels(list(features), out / "tsne.png"))
    files += list(extra_files)
    files.append(out / "summary.md")
    text = summary_markdown(results, settings, files, sections)
    (out / "summary.md").write_text(text)
    return Report(text, files)
