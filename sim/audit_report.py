"""The leakage audit's files: audit.md, audit.json, audit.csv and audit.png (real images beside
their reconstructions for each defense setting), and the section the report gets."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from .audit import AuditResult, AuditRow
from .plots import plot_image_rows
from .results import fmt_number

COLUMNS: list[tuple[str, str]] = [
    ("setting", "Defense setting"),
    ("accuracy", "Test acc. (%), mean ± std"),
    ("mb_per_round", "MB/round/device"),
    ("inversion_ssim", "Inversion SSIM"),
    ("inversion_psnr", "Inversion PSNR (dB)"),
    ("decoder_ssim", "Decoder SSIM"),
    ("decoder_psnr", "Decoder PSNR (dB)"),
    ("label_accuracy", "Labels from dL/dz"),
    ("tail_accuracy", "Labels from z (tail)"),
    ("chance", "Chance (uniform / majority)"),
]


def _cell(row: AuditRow, key: str) -> str:
    value = getattr(row, key)
    if key == "setting":
        return f"`{value}`"
    if value is None:
        return "not run"
    if key == "accuracy":
        return _percent(row)
    if key == "chance":
        return f"{value:.2f} / {row.majority:.2f}"
    if key.endswith("ssim") or key.endswith("accuracy"):
        return f"{value:.3f}" if key.endswith("ssim") else f"{value:.2f}"
    return fmt_number(value)


def _percent(row: AuditRow) -> str:
    """The seeds' mean accuracy in %, with its std when more than one seed ran."""
    if row.accuracy is None:
        return "not run"
    if len(row.accuracy_runs) < 2 or row.accuracy_std is None:
        return f"{100 * row.accuracy:.1f}"
    return f"{100 * row.accuracy:.1f} ± {100 * row.accuracy_std:.1f}"


def paired_gap(row: AuditRow, plain: AuditRow) -> tuple[float, float, int] | None:
    """Mean and sample std of (row - plain) accuracy over the seeds both ran, and their count."""
    mine = dict(zip(row.seeds, row.accuracy_runs, strict=True))
    theirs = dict(zip(plain.seeds, plain.accuracy_runs, strict=True))
    shared = [s for s in row.seeds if s in theirs]
    if not shared:
        return None
    diffs = np.array([mine[s] - theirs[s] for s in shared])
    return float(diffs.mean()), float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, len(diffs)


def seeds_text(rows: list[AuditRow]) -> str:
    """Which seeds the accuracy columns are over, e.g. 'seeds 0, 1, 2 (n = 3)'."""
    seeds = sorted({s for r in rows for s in r.seeds})
    if not seeds:
        return "no federation ran"
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (n = {len(seeds)})"


def table(rows: list[AuditRow]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(COLUMNS) - 1)) + "|")
    lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return lines


def print_audit(rows: list[AuditRow], console: Console) -> None:
    """The audit's table on the console (the columns of audit.md)."""
    table = Table(title="Leakage audit: what the server recovers, per defense setting")
    for index, (_, header) in enumerate(COLUMNS):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(row, key).strip("`") for key, _ in COLUMNS))
    console.print(table)


def findings(result: AuditResult) -> list[str]:
    """The acceptance questions, answered from the rows."""
    rows = {r.setting: r for r in result.rows}
    plain = next((r for r in result.rows if r.defense == "none"), None)
    if plain is None:
        return ["No undefended setting was audited, so there is no baseline to compare with."]
    out = [
        f"Without a defense the inversion recovers the device's images at SSIM "
        f"{plain.inversion_ssim:.3f} (PSNR {fmt_number(plain.inversion_psnr)} dB), the decoder at "
        f"{plain.decoder_ssim:.3f}; dL/dz gives {plain.label_accuracy:.2f} of the labels "
        f"(chance {plain.chance:.2f}), the tail alone {plain.tail_accuracy:.2f}."
    ]
    best = max(plain.inversion_ssim, plain.decoder_ssim)
    for row in rows.values():
        strongest = max(row.inversion_ssim, row.decoder_ssim)
        halved = strongest <= best / 2
        near_chance = row.label_accuracy <= row.chance + 0.1
        if halved and near_chance:
            cost = _cost(row, plain)
            out.append(
                f"`{row.setting}` halves the best attack's SSIM ({strongest:.3f} against "
                f"{best:.3f}) and leaves dL/dz at {row.label_accuracy:.2f} of the labels: {cost}."
            )
    if len(out) == 1:
        out.append("No setting both halved the best SSIM and brought dL/dz to near chance.")
    return out


def _cost(row: AuditRow, plain: AuditRow) -> str:
    """The accuracy the defense costs: both means ± std, and the paired gap over shared seeds."""
    if row.accuracy is None or plain.accuracy is None:
        return "accuracy not measured (not in --audit-accuracy)"
    text = f"test accuracy {_percent(row)}% against {_percent(plain)}% undefended"
    gap = paired_gap(row, plain)
    if gap is not None and gap[2] > 1:
        text += f" (paired over {gap[2]} seeds: {100 * gap[0]:+.1f} ± {100 * gap[1]:.1f} points)"
    return text


def markdown(result: AuditResult, level: int = 1) -> str:
    """audit.md's text; `level` 2 for the section inside the report."""
    mark = "#" * level
    lines = [
        f"{mark} Leakage audit",
        "",
        f"What a curious server recovers from what one device sends ({len(result.images)} of "
        f"the images shown in audit.png), per defense setting. The server knows the public head, "
        f"the prompt and tail ({result.params_from}), the settings, and z = body(h). "
        f"Inversion: Adam on the image from noise until head(x) (clipped as the devices clip) "
        f"matches the h sent, with a total-variation prior. Decoder: a small network trained on "
        f"{result.public_images} public images (the server's test set and pre-training classes) "
        f"through the same defense, applied to the h sent. SSIM (Wang et al. 2004) and PSNR "
        f"against the real images, on grey values in [0, 1]. Labels: for each candidate, the dL/dz "
        f"the device would send; the nearest wins. 'Labels from z' is what the tail predicts "
        f"without any gradient, which no defense on dL/dz hides. Clip alone uses C = "
        f"{result.clip_bound:g}, just above every public h's norm. Test accuracy (mean ± sample "
        f"std) and bytes come from a federation with that defense per seed where one ran "
        f"('not run' otherwise), over {seeds_text(result.rows)}: the same seeds and partitions "
        f"for every setting. The federations' devices draw their noise from OS entropy, so a "
        f"seed fixes the partition and the training order, not the noise; the attacks' noise "
        f"is seeded. Chance: a uniform guess, and always guessing the audited images' most "
        f"common label.",
        "",
        *table(result.rows),
        "",
        *[f"- {s}" for s in findings(result)],
        "",
        "Each setting's defense, as the devices apply it:",
        "",
        *[f"- `{r.setting}`: {r.defense}" for r in result.rows],
        "",
    ]
    return "\n".join(lines)


def plot_reconstructions(result: AuditResult, path: Path) -> Path:
    """Real images in the top row; below, per setting, the inversion's and the decoder's."""
    panels = [("real", result.images)]
    for row in result.rows:
        panels.append((f"{row.setting}\ninversion", result.inversions[row.setting]))
        panels.append((f"{row.setting}\ndecoder", result.decodings[row.setting]))
    title = "What the server reconstructs from h, per defense setting"
    return plot_image_rows(panels, len(result.images), title, path)


def write_audit(folder: Path, result: AuditResult) -> list[Path]:
    """audit.md, audit.json, audit.csv and audit.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "audit.md"
    md.write_text(markdown(result))
    data = {
        "rows": [_json_row(r) for r in result.rows],
        "clip_bound": result.clip_bound,
        "params_from": result.params_from,
        "public_images": result.public_images,
    }
    js = folder / "audit.json"
    js.write_text(json.dumps(data, indent=1))
    table_path = folder / "audit.csv"
    with table_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(AuditRow)])
        writer.writeheader()
        writer.writerows(_csv_row(r) for r in result.rows)
    return [md, js, table_path, plot_reconstructions(result, folder / "audit.png")]


def _csv_row(row: AuditRow) -> dict:
    """A row with its per-seed lists joined by ';' (one cell each)."""
    values = asdict(row)
    for key in ("accuracy_runs", "seeds"):
        values[key] = ";".join(str(v) for v in values[key])
    return values


def _json_row(row: AuditRow) -> dict:
    """A row with inf (a perfect PSNR) written as a string, which JSON can hold."""
    values = asdict(row)
    return {k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in values.items()}
