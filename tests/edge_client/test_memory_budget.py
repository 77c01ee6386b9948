"""The micro-batch chooser measures real child processes and keeps within the budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sfprompt.edge_client.memory_budget import (
    MemoryBudgetError,
    candidate_micro_batches,
    choose_micro_batch,
    measure_step,
)
from sfprompt.edge_client.profile import ProfileConfig, run_profile
from sfprompt.protocol.bundle import BundleError
from tests.bundles import ExportedCases

GENEROUS_MB = 100_000.0


@pytest.fixture(scope="module")
def bundle(exported_cases: ExportedCases) -> Path:
    """One tail block, mean pooling: the bundle the TorchScript runtime tests use too."""
    return exported_cases["avg_m1"].result.device_dir


def test_candidates_are_the_batch_then_powers_of_two_below_it() -> None:
    assert candidate_micro_batches(8) == [8, 4, 2, 1]
    assert candidate_micro_batches(20) == [20, 16, 8, 4, 2, 1]
    assert candidate_micro_batches(3) == [3, 2, 1]
    assert candidate_micro_batches(1) == [1]


def test_a_generous_budget_takes_the_whole_batch(bundle: Path) -> None:
    choice = choose_micro_batch(bundle, "onnx", batch=4, budget_mb=GENEROUS_MB, threads=1)
    assert choice.micro_batch == 4
    # The smallest is measured first (if it did not fit nothing would), then the largest.
    assert sorted(choice.measured) == [1, 4]
    # A child holds at least the interpreter, numpy and onnxruntime: a real process was measured.
    assert 20 < choice.peak_rss_mb == choice.measured[4] <= GENEROUS_MB


def test_an_impossible_budget_says_what_would_fit(bundle: Path) -> None:
    with pytest.raises(MemoryBudgetError) as info:
        choose_micro_batch(bundle, "onnx", batch=4, budget_mb=1, threads=1)
    message = str(info.value)
    found = re.search(
        r"smallest peak measured was (\d+) MB \(micro-batch 1\); "
        r"a budget of at least (\d+) MB would fit",
        message,
    )
    assert found, message
    assert 20 < int(found.group(1)) <= int(found.group(2))
    assert isinstance(info.value, ValueError)


def test_bad_arguments_are_refused_before_any_child_runs(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        choose_micro_batch(bundle, "tflite", 4, GENEROUS_MB)
    with pytest.raises(ValueError, match="positive number of MB"):
        choose_micro_batch(bundle, "onnx", 4, 0)
    with pytest.raises(BundleError, match="is not a bundle"):
        choose_micro_batch(tmp_path, "onnx", 4, GENEROUS_MB)


@pytest.mark.slow
def test_the_onnx_child_never_imports_torch_and_the_torchscript_child_does(bundle: Path) -> None:
    onnx = measure_step(bundle, "onnx", batch=3, micro_batch=2, threads=1)
    ts = measure_step(bundle, "torchscript", batch=3, micro_batch=2, threads=1)
    assert (onnx.torch_loaded, ts.torch_loaded) == (False, True)
    assert onnx.micro_batch == ts.micro_batch == 2
    assert onnx.step_s > 0 and ts.step_s > 0


def test_profile_chooses_the_micro_batch_and_reports_it(bundle: Path, tmp_path: Path) -> None:
    cfg = ProfileConfig(
        bundle, batch=2, steps=1, threads=1, micro_batch=1, out=tmp_path, memory_budget_mb=1e5
    )
    result = run_profile(cfg)
    assert result.micro_batch == 2  # the budget overrides the configured micro-batch of 1
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["runtime"] == "onnx"
    assert report["budget"]["micro_batch"] == 2
    assert report["peak_rss_mb"] == pytest.approx(result.peak_rss_mb)
    assert (tmp_path / "memory_timeline.png").stat().st_size > 0


def test_profile_runs_the_torchscript_runtime(bundle: Path) -> None:
    result = run_profile(ProfileConfig(bundle, batch=2, steps=1, threads=1, runtime="torchscript"))
    assert result.runtime == "torchscript" and result.budget is None
    assert {"load", "head_forward", "tail_step", "head_vjp", "update"} <= set(result.phases)
    with pytest.raises(ValueError, match="unknown runtime"):
        run_profile(ProfileConfig(bundle, runtime="tflite"))
