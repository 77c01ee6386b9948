"""t-SNE panels of the features the tail reads, one per model (the appendix's Figures 3-6).

The appendix argues that SFPrompt yields well separated classes without tuning the backbone; a
picture per model shows it, and a silhouette score (on the features themselves, not on the
t-SNE plane, whose layout varies with the seed) puts one number on each picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from .results import LABELS, Features

MAX_POINTS = 500  # t-SNE is quadratic-ish; 500 points keep one panel to a few seconds on a laptop
MIN_POINTS = 5
TITLES = {"untuned": "untuned", **LABELS}


def _check(item: Features) -> None:
    """Raise ValueError naming the panel when its arrays cannot be plotted."""
    feats, labels = np.asarray(item.features), np.asarray(item.labels)
    if feats.ndim != 2:
        raise ValueError(f"features {item.name!r}: expected (N, D), got shape {feats.shape}")
    if labels.shape != (feats.shape[0],):
        raise ValueError(
            f"features {item.name!r}: labels shape {labels.shape} does not match "
            f"{feats.shape[0]} feature rows"
        )
    if feats.shape[0] < MIN_POINTS:
        raise ValueError(
            f"features {item.name!r}: t-SNE needs at least {MIN_POINTS} points, "
            f"got {feats.shape[0]}"
        )
    if not np.isfinite(feats).all():
        raise ValueError(f"features {item.name!r}: contains NaN or infinite values")


def subsample(
    item: Features, max_points: int = MAX_POINTS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` rows, drawn without replacement with a fixed seed."""
    feats = np.asarray(item.features, dtype=np.float32)
    labels = np.asarray(item.labels)
    if len(feats) <= max_points:
        return feats, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(feats), max_points, replace=False))
    return feats[keep], labels[keep]


def embed(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with perplexity min(30, N / 4), seeded so reruns draw the same picture.

    One OpenMP thread: at 500 points threads gain little, and on a busy 2-core machine (the
    simulation's own processes) their spin-waiting made the fit ten times slower (3 s -> 38 s).
    """
    perplexity = min(30.0, len(features) / 4)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(limits=1):
        return tsne.fit_transform(features.astype(np.float64))


def separation(features: np.ndarray, labels: np.ndarray) -> float | None:
    """Silhouette of the classes in feature space; None when it is undefined (one class)."""
    n_classes = len(np.unique(labels))
    if not 2 <= n_classes < len(labels):
        return None
    return float(silhouette_score(features, labels))


def tsne_panels(
    features: Sequence[Features], path: Path, max_points: int = MAX_POINTS, seed: int = 0
) -> Path:
    """Write one t-SNE panel per Features to `path` (PNG); points coloured by label.

    Raises ValueError when `features` is empty or an item's arrays are malformed.
    """
    if not features:
        raise ValueError("tsne_panels: no features given")
    for item in features:
        _check(item)
    classes = np.unique(np.concatenate([np.asarray(f.labels) for f in features]))
    colors = _class_colors(classes)
    fig = Figure(figsize=(4.2 * len(features), 4.6), layout="constrained")
    axes = fig.subplots(1, len(features), squeeze=False)[0]
    for ax, item in zip(axes, features):
        feats, labels = subsample(item, max_points, seed)
        points = embed(feats, seed)
        for cls in classes:
            mask = labels == cls
            if mask.any():
                ax.scatter(*points[mask].T, s=7, color=colors[cls], linewidths=0)
        score = separation(feats, labels)
        subtitle = f"{len(feats)} points" + ("" if score is None else f", silhouette {score:.2f}")
        ax.set_title(f"{TITLES.get(item.name, item.name)}\n{subtitle}", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    if len(classes) <= 20:
        handles = [
            Line2D([], [], marker="o", linestyle="", color=colors[c], label=str(c)) for c in classes
        ]
        fig.legend(handles=handles, title="label", loc="outside right center")
    fig.suptitle("t-SNE of the features the tail reads (test images)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _class_colors(classes: np.ndarray) -> dict:
    """A stable colour per class: tab10 / tab20 when they suffice, else a continuous map."""
    name = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"
    cmap = colormaps[name]
    if name == "viridis":
        return {c: cmap(i / max(1, len(classes) - 1)) for i, c in enumerate(classes)}
    return {c: cmap(i) for i, c in enumerate(classes)}
