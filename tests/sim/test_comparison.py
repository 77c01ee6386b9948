"""The comparison over seeds: mean ± std per partition and method, gaps against the noise,
partitions by name, the band plot; and the centralised ceilings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfprompt.sim.ceilings import Ceiling
from sfprompt.sim.comparison import SeedRun, comparison_rows, gaps, write_comparison
from sfprompt.sim.partition import partition_for
from sfprompt.sim.results import MethodResult, RoundRecord


def _result(method: str, accuracies: list[float], mb: float = 1.0) -> MethodResult:
    rounds = [
        RoundRecord(i + 1, a, 1.0, mb * 5e5, mb * 5e5, 1.0, 10.0, 1.0)
        for i, a in enumerate(accuracies)
    ]
    return MethodResult(method, 5, rounds)


def _runs() -> list[SeedRun]:
    return [
        SeedRun("iid", 0, [_result("sfprompt", [0.5, 0.80]), _result("fl_full", [0.6, 0.70])]),
        SeedRun("iid", 1, [_result("sfprompt", [0.5, 0.84]), _result("fl_full", [0.6, 0.72])]),
        SeedRun("iid", 2, [_result("sfprompt", [0.5, 0.82]), _result("fl_full", [0.6, 0.74])]),
        SeedRun(
            "dirichlet:0.1", 0, [_result("sfprompt", [0.3, 0.40]), _result("fl_full", [0.5, 0.6])]
        ),
        SeedRun(
            "dirichlet:0.1", 1, [_result("sfprompt", [0.3, 0.60]), _result("fl_full", [0.5, 0.5])]
        ),
    ]


def test_rows_hold_mean_and_sample_std_of_the_final_accuracy_per_partition() -> None:
    rows = {(r.partition, r.method): r for r in comparison_rows(_runs())}
    assert len(rows) == 4
    iid = rows["iid", "sfprompt"]
    assert iid.seeds == 3 and iid.final_mean == pytest.approx(0.82)
    assert iid.final_std == pytest.approx(np.std([0.80, 0.84, 0.82], ddof=1))
    assert iid.best_mean == pytest.approx(0.82) and iid.mb_per_round == pytest.approx(1.0)
    skewed = rows["dirichlet:0.1", "fl_full"]
    assert skewed.seeds == 2 and skewed.final_mean == pytest.approx(0.55)


def test_gaps_say_whether_they_exceed_the_noise() -> None:
    text = gaps(comparison_rows(_runs()))
    iid = next(s for s in text if s.startswith("IID"))
    assert "+10.0 points" in iid and "ahead" in iid  # 82 vs 72, stds 2 and 2
    skewed = next(s for s in text if s.startswith("Dirichlet alpha=0.1"))
    assert "-5.0 points" in skewed and "within the noise" in skewed  # 50 vs 55, stds 14 and 7


def test_write_comparison_writes_the_table_the_ceilings_and_the_bands(tmp_path: Path) -> None:
    ceilings = [Ceiling("linear_probe", 0.75, 5, 100, 1.0), Ceiling("full", 0.9, 5, 100, 2.0)]
    files = write_comparison(tmp_path, _runs(), ceilings, {"seeds": "3"})
    assert [f.name for f in files] == ["comparison.md", "comparison.json", "accuracy_bands.png"]
    text = (tmp_path / "comparison.md").read_text()
    assert "| IID | SFPrompt | 3 | 82.0 ± 2.0 |" in text
    assert "| Centralised full fine-tuning | 90.0 |" in text
    assert (tmp_path / "accuracy_bands.png").read_bytes()[:4] == b"\x89PNG"


def test_partitions_by_name() -> None:
    labels = np.repeat(np.arange(5), 40)
    iid = partition_for("iid", labels, 4, 0.1, seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(200))
    assert partition_for("iid", labels, 4, 0.1, 0)[0].tolist() == iid[0].tolist()  # seeded
    assert partition_for("iid", labels, 4, 0.1, 1)[0].tolist() != iid[0].tolist()
    skewed = partition_for("dirichlet:0.1", labels, 4, 9.9, seed=0)
    classes_per_device = [len(np.unique(labels[p])) for p in skewed]
    assert min(classes_per_device) < 5  # alpha 0.1 leaves devices without some classes
    with pytest.raises(ValueError, match="unknown partition"):
        partition_for("dirichlet-0.1", labels, 4, 0.1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear_probe", "prompt_tail", "full"])
def test_each_ceiling_learns_a_task_its_parameters_can_learn(kind: str) -> None:
    """On coloured squares (tests/sim/test_baselines.py) every ceiling beats chance (25%) by
    far after three epochs, and training leaves the backbone `spec` builds untouched."""
    import torch

    from sfprompt.sim.ceilings import CeilingConfig, run_ceiling

    from .test_baselines import CUT, PREPROCESS, build, digits_like

    before = {k: v.clone() for k, v in build().state_dict().items()}
    train, test = digits_like(192, seed=1), digits_like(96, seed=2)
    lr = 0.02 if kind == "full" else 0.05  # a random tiny ViT: every weight moves faster
    cfg = CeilingConfig(epochs=3, batch_size=16, lr=((kind, lr),))
    ceiling = run_ceiling(kind, build, PREPROCESS, train, test, CUT, cfg)
    assert ceiling.kind == kind and ceiling.train_samples == 192 and ceiling.epochs == 3
    assert ceiling.accuracy > 0.5, ceiling
    after = build().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="unknown ceiling"):
        run_ceiling("probe", build, PREPROCESS, train, test, CUT, cfg)


def test_the_simulator_refuses_a_bad_comparison_before_any_work() -> None:
    from sfprompt.sim.config import SimConfig

    for bad in ({"seeds": 0}, {"partitions": ("dirichlet:x",)}, {"partitions": ()}):
        with pytest.raises(ValueError):
            SimConfig(**bad)
    assert SimConfig(partitions=("iid", "dirichlet", "dirichlet:0.5")).seeds == 3
