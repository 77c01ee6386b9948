"""The report's plots: accuracy per round and against bytes, cost bars, the clients sweep.

One colour and marker per method in every figure, SFPrompt drawn boldest; matplotlib's
object API (no pyplot state), so plots can be drawn from any thread without a screen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from sfprompt.units import MB

from .results import METHODS, MethodResult, fmt_number

MARKERS = "osD^vPX*"


def _style(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A fixed colour and marker per method id, the same in every plot; SFPrompt drawn boldest."""
    cmap = colormaps["tab10"]
    styles: dict[str, dict[str, Any]] = {}
    for extra, method in enumerate(m for m in dict.fromkeys(methods) if m not in METHODS):
        styles[method] = {"color": cmap(7 + extra % 3), "marker": MARKERS[-1]}
    for index, method in enumerate(METHODS):
        styles[method] = {"color": cmap(index), "marker": MARKERS[index % len(MARKERS)]}
    styles["sfprompt"].update(linewidth=2.6, zorder=3)
    return styles


def _plain(x: float, _: int) -> str:
    """Tick labels 0.1, 1, 10 on log axes, rather than 10^-1."""
    return f"{x:g}"


def plot_image_rows(
    panels: list[tuple[str, np.ndarray]], shown: int, title: str, path: Path, fontsize: int = 7
) -> Path:
    """Grey images in [0, 1], a labelled row per panel, at most `shown` per row."""
    fig = Figure(figsize=(1.1 * shown + 2.6, 1.1 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), shown, squeeze=False)
    for (label, images), line in zip(panels, axes, strict=True):
        for ax, image in zip(line, images[:shown], strict=False):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        for ax in line:
            ax.set_xticks([])
            ax.set_yticks([])
        line[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=fontsize)
    fig.suptitle(title)
    return _finish(fig, path, legend=False)


def _finish(fig: Figure, path: Path, legend: bool = True) -> Path:
    if legend:  # outside the axes: with seven methods any inside spot hides a curve
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center")
    fig.savefig(path, dpi=120)
    return path


def plot_accuracy(results: Sequence[MethodResult], path: Path, by_bytes: bool = False) -> Path:
    """Accuracy per round, or against cumulative bytes per device (log x) when `by_bytes`."""
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.subplots()
    styles = _style([r.method for r in results])
    for result in results:
        acc = np.array([100 * r.accuracy for r in result.rounds])
        if by_bytes:
            x = np.cumsum([r.bytes_up + r.bytes_down for r in result.rounds]) / MB
            keep = x > 0  # a log axis cannot show zero bytes
            x, acc = x[keep], acc[keep]
        else:
            x = np.array([r.round for r in result.rounds])
        ax.plot(x, acc, label=result.label, markersize=5, **styles[result.method])
    if by_bytes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.set_xlabel("cumulative bytes per device, up + down (MB, log scale)")
        ax.set_title("Test accuracy against communication per device")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_title("Test accuracy after each round")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    return _finish(fig, path)


def plot_bars(rows: list[dict[str, Any]], key: str, path: Path, title: str, xlabel: str) -> Path:
    """Horizontal bars of one summary column per method, values written on the bars."""
    fig = Figure(figsize=(7, 0.55 * len(rows) + 1.6), layout="constrained")
    ax = fig.subplots()
    styles = _style([row["method"] for row in rows])
    values = [row[key] for row in rows]
    top = max((v for v in values if v is not None), default=1.0) or 1.0
    starred = False
    for y, (row, value) in enumerate(zip(rows, values)):
        ax.barh(y, value or 0.0, color=styles[row["method"]]["color"])
        star = "*" if key in row["estimated"] and value is not None else ""
        starred |= bool(star)
        ax.text((value or 0.0) + 0.01 * top, y, fmt_number(value) + star, va="center")
    ax.set_yticks(range(len(rows)), [row["label"] for row in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(xlabel + ("; * estimated, not measured" if starred else ""))
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return _finish(fig, path, legend=False)


def plot_clients_sweep(sweep: dict[int, list[MethodResult]], path: Path) -> Path:
    """Final accuracy and bytes per round per device against the number of clients.

    Raises ValueError when a key is not a client count (write_report checks the results).
    """
    if any(not isinstance(n, int) or n < 1 for n in sweep):
        raise ValueError(f"clients sweep: keys must be client counts >= 1, got {list(sweep)}")
    fig = Figure(figsize=(12, 4.3), layout="constrained")
    ax_acc, ax_bytes = fig.subplots(1, 2)
    runs = [(n, r) for n in sorted(sweep) for r in sweep[n]]
    styles = _style([r.method for _, r in runs])
    for method in dict.fromkeys(r.method for _, r in runs):
        points = [(n, r) for n, r in runs if r.method == method]
        clients, label = [n for n, _ in points], points[0][1].label
        acc = [100 * r.final_accuracy for _, r in points]
        ax_acc.plot(clients, acc, label=label, **styles[method])
        ax_bytes.plot(clients, [r.bytes_per_round / MB for _, r in points], **styles[method])
    for ax in (ax_acc, ax_bytes):
        ax.set_xticks(sorted(sweep))
        ax.set_xlabel("number of clients")
        ax.grid(True, which="both", alpha=0.3)
    ax_acc.set_ylabel("final test accuracy (%)")
    ax_acc.set_title("Accuracy vs number of clients")
    ax_bytes.set_yscale("log")
    ax_bytes.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax_bytes.set_ylabel("bytes per round per device, up + down (MB, log scale)")
    ax_bytes.set_title("Communication vs number of clients")
    return _finish(fig, path)
