"""The README's main job, shortened: `sfprompt-sim` runs real processes for the split methods,
the in-process baselines on the same shards, over two seeds in two partitions, the ceilings,
and writes the whole report (CI's short multi-seed run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_sfprompt_sim_runs_the_default_comparison_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    proc = subprocess.run(
        [
            str(BIN / "sfprompt-sim"), "--data", "digits", "--rounds", "2", "--clients", "2",
            "--pretrain-epochs", "1", "--model-arg", "depth=3", "--seeds", "2",
            "--partitions", "iid,dirichlet:0.5", "--ceiling-epochs", "1",
            "--methods", "sfprompt,sfl,sfl_linear,fl_full",
            "--cache", str(tmp_path / "cache"), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out / "report"
    for name in ("results.json", "metrics.csv", "summary.md", "accuracy.png",
                 "accuracy_vs_bytes.png", "memory.png", "tsne.png", "comparison.md",
                 "comparison.json", "accuracy_bands.png"):  # fmt: skip
        assert (report / name).stat().st_size > 0, name
    results = {r["method"]: r for r in json.loads((report / "results.json").read_text())}
    assert set(results) == {"sfprompt", "sfl", "sfl_linear", "fl_full"}
    for result in results.values():
        assert [r["round"] for r in result["rounds"]] == [1, 2]
        for record in result["rounds"]:
            assert 0.0 <= record["accuracy"] <= 1.0 and record["bytes_up"] > 0
    wire = results["sfprompt"]["rounds"][0]
    assert wire["measured"]["bytes"] and wire["device_peak_mb"] > 0
    summary = (report / "summary.md").read_text()
    assert "SFPrompt" in summary and "Bytes vs FL full" in summary and "Bytes vs SFL" in summary
    sfprompt_row = next(line for line in summary.splitlines() if line.startswith("| SFPrompt |"))
    assert "n/a" not in sfprompt_row  # ratios to SFL and to FL full are both reported
    assert "SFPrompt" in proc.stdout  # the summary table is printed
    comparison = json.loads((report / "comparison.json").read_text())
    runs = {(r["partition"], r["seed"]) for r in comparison["runs"]}
    assert runs == {("iid", 0), ("iid", 1), ("dirichlet:0.5", 0), ("dirichlet:0.5", 1)}
    assert {(r["partition"], r["method"]) for r in comparison["rows"]} == {
        (p, m) for p in ("iid", "dirichlet:0.5") for m in results
    }
    for row in comparison["rows"]:
        finals = [
            next(m for m in run["results"] if m["method"] == row["method"])["rounds"][-1]
            for run in comparison["runs"]
            if run["partition"] == row["partition"]
        ]
        assert row["seeds"] == 2
        assert row["final_mean"] == pytest.approx(sum(f["accuracy"] for f in finals) / 2)
    assert [c["kind"] for c in comparison["ceilings"]] == ["linear_probe", "prompt_tail", "full"]
    assert "mean ± std" in proc.stdout and "Centralised full fine-tuning" in proc.stdout
