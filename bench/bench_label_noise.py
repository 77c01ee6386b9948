"""Label inference from dL/dz by a server that knows z and the tail, against the devices' noise.

The tail at M = 0 is a LayerNorm and a linear classifier under a batch-mean cross-entropy
(export/split_vit.py `Tail`), so the server can compute dL/dz for every candidate label and take
the one nearest to what the device sent (docs/threat-model.md, "Noise on dL/dz"). Here in numpy,
on synthetic clustered z (a tail of chosen accuracy, LayerNorm without affine weights), with the
device's own `max_norm_noise` and `relative_noise`. It prints the attack's label accuracy on all
rows / on the rows the tail itself misclassifies (what the gradient tells beyond the tail's own
prediction on z), per noise multiplier A (`--defense-grad-noise`), with and without max-norm.

    python bench/bench_label_noise.py [--batches 80] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

from sfprompt.edge_client.defenses import max_norm_noise, relative_noise

MULTIPLIERS = (0, 1, 4, 8, 16, 32, 64)
# (d, classes, fit): fit aligns the classifier with the class means (the tail's accuracy).
CASES = ((96, 5, 0.6), (768, 10, 0.12), (768, 10, 2.0))


def tail_gradient(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dL/dz (B, d) of mean cross-entropy(LayerNorm(z) @ w.T, y), and the tail's predictions."""
    mean, std = z.mean(1, keepdims=True), np.sqrt(z.var(1, keepdims=True) + 1e-6)
    x = (z - mean) / std
    logits = x @ w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = (p - np.eye(len(w))[y]) @ w / len(z)  # dL/dx
    grad = (u - u.mean(1, keepdims=True) - x * (u * x).mean(1, keepdims=True)) / std
    return grad, p.argmax(1)


def attack(
    d: int, classes: int, fit: float, multiplier: float, max_norm: bool, batches: int, seed: int
) -> tuple[float, float, float]:
    """(attack accuracy on all rows, the tail's own accuracy, attack accuracy on its errors)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, d))
    w = (fit * means + rng.standard_normal((classes, d))) / np.sqrt(d)
    hits = tail_hits = error_hits = errors = rows = 0
    for _ in range(batches):
        y = rng.integers(0, classes, 32)
        z = means[y] + 3 * rng.standard_normal((32, d))
        grad, predicted = tail_gradient(z, y, w)
        noise = np.random.default_rng(rng.integers(1 << 31))
        sent = grad.astype(np.float32)
        if max_norm:
            sent = max_norm_noise(sent, noise)
        sent = relative_noise(sent, multiplier, noise)
        candidates = np.stack(
            [tail_gradient(z, np.full(32, c), w)[0] for c in range(classes)], axis=1
        )
        guess = np.argmin(((candidates - sent[:, None, :]) ** 2).sum(-1), axis=1)
        wrong = predicted != y
        hits += int((guess == y).sum())
        tail_hits += int((~wrong).sum())
        error_hits += int((guess == y)[wrong].sum())
        errors += int(wrong.sum())
        rows += 32
    return hits / rows, tail_hits / rows, (error_hits / errors if errors else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=80, help="batches of 32 rows per cell")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = " | ".join(f"A = {a}" for a in MULTIPLIERS)
    print(f"| d, classes (tail's own accuracy) | {header} |")
    for d, classes, fit in CASES:
        for max_norm in (False, True):
            cells, tail = [], 0.0
            for multiplier in MULTIPLIERS:
                on_all, tail, on_errors = attack(
                    d, classes, fit, multiplier, max_norm, args.batches, args.seed
                )
                cells.append(f"{on_all:.2f} / {on_errors:.2f}")
            name = f"{d}, {classes}" + (", with max-norm" if max_norm else f" ({tail:.2f})")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
