"""The README's main job, shortened: `sfprompt-sim` runs real processes for the split methods,
the in-process baselines on the same shards, and writes the whole report."""

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
            str(BIN / "sfprompt-sim"), "--rounds", "2", "--clients", "2", "--pretrain-epochs", "1",
            "--model-arg", "depth=3", "--cache", str(tmp_path / "cache"), "--out", str(out),
        ],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out / "report"
    for name in ("results.json", "metrics.csv", "summary.md", "accuracy.png",
                 "accuracy_vs_bytes.png", "memory.png", "tsne.png"):  # fmt: skip
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
