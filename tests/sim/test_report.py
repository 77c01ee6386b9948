"""The simulator's report: every file is written, and the summary's numbers are the right ones."""

from __future__ import annotations

import csv
import io
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sfprompt.sim.report import print_summary, summary_table, write_report
from sfprompt.sim.results import Features, MethodResult, RoundRecord, load_results
from sfprompt.sim.tsne import subsample, tsne_panels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def method(
    name: str, acc: list[float], up: list[float], down: list[float], peak: float, clients: int = 4
) -> MethodResult:
    """Three rounds of one method; FLOPs 2 GFLOP per MB up, memory estimated, bytes measured."""
    rounds = [
        RoundRecord(
            round=i + 1,
            accuracy=a,
            loss=1.0 - a,
            bytes_up=u,
            bytes_down=d,
            device_flops=2e9 * u / 1e6,
            device_peak_mb=peak + i,
            seconds=1.5,
            est_round_minutes=0.5 * (i + 1) if name != "sfl_linear" else 0.0,
            measured={"bytes": True, "memory": False},
        )
        for i, (a, u, d) in enumerate(zip(acc, up, down))
    ]
    return MethodResult(name, clients, rounds, notes=[f"{name} synthetic"])


def three_methods(clients: int = 4) -> list[MethodResult]:
    # Bytes per round (up + down, MB): SFPrompt 3, SFL+Linear (3+4+5)/3 = 4, FL full 10.
    return [
        method("sfprompt", [0.5, 0.7, 0.8], [1e6] * 3, [2e6] * 3, 100, clients),
        method("sfl_linear", [0.4, 0.6, 0.65], [2e6, 3e6, 4e6], [1e6] * 3, 120, clients),
        method("fl_full", [0.3, 0.9, 0.85], [5e6] * 3, [5e6] * 3, 400, clients),
    ]


def blobs(name: str, n: int = 120, seed: int = 0) -> Features:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    feats = rng.normal(size=(n, 16)) + 4.0 * np.eye(16)[labels]
    return Features(name, feats.astype(np.float32), labels.astype(np.int64))


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The summary's Markdown table as {method label: {column header: cell}}."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {row[0]: dict(zip(header, row)) for row in rows}


@pytest.mark.slow
def test_report_writes_every_file_and_the_right_numbers(tmp_path: Path) -> None:
    """All files appear; the table's byte ratios and the findings match hand arithmetic."""
    results = three_methods()
    features = [
        blobs(n, seed=i) for i, n in enumerate(["untuned", "fl_full", "sfl_linear", "sfprompt"])
    ]
    sweep = {n: three_methods(n) for n in (2, 4, 8)}
    report = write_report(
        tmp_path / "out", results, features, sweep, settings={"seed": 0, "model": {"depth": 6}}
    )
    names = {p.name for p in report.files}
    assert names == {
        "results.json",
        "metrics.csv",
        "summary.md",
        "accuracy.png",
        "accuracy_vs_bytes.png",
        "memory.png",
        "time.png",
        "clients_sweep.png",
        "tsne.png",
    }
    for path in report.files:
        assert path.is_file() and path.stat().st_size > 0, path
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert [r.method for r in load_results(tmp_path / "out" / "results.json")] == [
        "sfprompt",
        "sfl_linear",
        "fl_full",
    ]

    text = (tmp_path / "out" / "summary.md").read_text()
    assert text == report.summary_markdown
    rows = table_rows(text)
    assert set(rows) == {"SFPrompt", "SFL+Linear", "FL full fine-tuning"}
    sfp, lin, fl = rows["SFPrompt"], rows["SFL+Linear"], rows["FL full fine-tuning"]
    assert sfp["Final acc. (%)"] == "80.00" and fl["Best acc. (%)"] == "90.00"
    assert (sfp["MB/round/device (up+down)"], sfp["Up MB"], sfp["Down MB"]) == (
        "3.00",
        "1.00",
        "2.00",
    )
    assert lin["MB/round/device (up+down)"] == "4.00" and lin["Up MB"] == "3.00"
    assert sfp["Bytes vs FL full"] == "0.30x"  # 3 / 10
    assert lin["Bytes vs FL full"] == "0.40x"  # 4 / 10
    assert fl["Bytes vs FL full"] == "1.00x"
    assert {r["Bytes vs SFL"] for r in rows.values()} == {"n/a"}  # SFL did not run
    assert sfp["Device GFLOP/round"] == "2.00" and fl["Device GFLOP/round"] == "10.0"
    assert sfp["Device peak MB"] == "102*"  # max over rounds; estimated per RoundRecord.measured
    assert sfp["Est. round (min)"] == "1.00"  # mean of 0.5, 1.0, 1.5
    assert lin["Est. round (min)"] == "n/a"  # no estimate was made
    assert (
        "SFPrompt reached 80.00% vs FL full fine-tuning 85.00% using 0.30x its bytes per round, "
        "0.20x its device FLOPs per round and 0.25x its device peak memory (estimated)" in text
    )  # memory: 102 / 402 is 0.25
    assert "SFPrompt reached 80.00% vs SFL+Linear 65.00% using 0.75x its bytes" in text
    assert "- SFPrompt: measured: bytes; estimated: memory. Note: sfprompt synthetic." in text
    assert '- model: {"depth": 6}' in text and "- seed: 0" in text


def test_metrics_csv_has_one_row_per_method_and_round(tmp_path: Path) -> None:
    """9 rows (3 methods x 3 rounds) with every RoundRecord field, `measured` flattened."""
    write_report(tmp_path, three_methods())
    with (tmp_path / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    expected = {f.name for f in fields(RoundRecord)} - {"measured"}
    assert expected | {"method", "measured.bytes", "measured.memory"} <= set(rows[0])
    fl_round2 = next(r for r in rows if r["method"] == "fl_full" and r["round"] == "2")
    assert float(fl_round2["accuracy"]) == 0.9 and float(fl_round2["bytes_up"]) == 5e6
    assert fl_round2["measured.memory"] == "False"
    assert not (tmp_path / "tsne.png").exists() and not (tmp_path / "clients_sweep.png").exists()


def test_ratios_to_sfl_when_sfl_ran() -> None:
    """With SFL present every row gets bytes / SFL's bytes; FL full missing gives None (n/a)."""
    results = three_methods()[:2] + [method("sfl", [0.5] * 3, [4e6] * 3, [4e6] * 3, 150)]
    rows = {row["method"]: row for row in summary_table(results)}
    assert rows["sfprompt"]["bytes_vs_sfl"] == pytest.approx(3 / 8)
    assert rows["sfl_linear"]["bytes_vs_sfl"] == pytest.approx(4 / 8)
    assert rows["sfl"]["bytes_vs_sfl"] == pytest.approx(1.0)
    assert all(row["bytes_vs_fl_full"] is None for row in rows.values())
    assert rows["sfl"]["estimated"] == ["device_peak_mb"]  # memory: measured False every round

    results[0].rounds[0].measured = {"bytes": False, "memory": False}  # bytes estimated once
    assert "mb_per_round" in summary_table(results)[0]["estimated"]

    console = Console(file=io.StringIO(), width=300, record=True)
    print_summary(results, console)
    printed = console.export_text()
    assert "SFPrompt" in printed and "0.38x" in printed and "n/a" in printed
    assert "3.00*" in printed  # SFPrompt's bytes, now partly estimated


def test_bad_results_are_refused(tmp_path: Path) -> None:
    """Percentages instead of fractions, duplicated methods and no results raise clearly."""
    bad = three_methods()
    bad[0].rounds[1].accuracy = 70.0
    with pytest.raises(ValueError, match=r"sfprompt round 2: accuracy must be a fraction"):
        write_report(tmp_path, bad)
    with pytest.raises(ValueError, match="duplicates"):
        summary_table(three_methods() + three_methods()[:1])
    with pytest.raises(ValueError, match="no method results"):
        summary_table([])
    assert not (tmp_path / "summary.md").exists()


def test_tsne_subsamples_and_checks_its_input(tmp_path: Path) -> None:
    """At most 500 points per panel, the same ones every time; malformed features are refused."""
    big = blobs("sfprompt", n=700)
    feats, labels = subsample(big)
    again, _ = subsample(big)
    assert feats.shape == (500, 16) and labels.shape == (500,)
    assert np.array_equal(feats, again)
    with pytest.raises(ValueError, match="labels shape"):
        tsne_panels([Features("x", np.zeros((10, 4)), np.zeros(9))], tmp_path / "t.png")
    with pytest.raises(ValueError, match="at least 5 points"):
        tsne_panels([Features("x", np.zeros((3, 4)), np.zeros(3))], tmp_path / "t.png")
    with pytest.raises(ValueError, match="no features"):
        tsne_panels([], tmp_path / "t.png")
