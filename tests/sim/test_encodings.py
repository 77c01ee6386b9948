"""The encodings sweep: settings by name, the table against fp32 from a tiny fake result set, its
files, how the simulator hands a setting to serve, and the bytes at the paper's scale."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from sfprompt.cloud_server.rounds import SAME_ENCODING, RoundConfig
from sfprompt.sim.comparison import write_comparison
from sfprompt.sim.config import SimConfig
from sfprompt.sim.encodings import (
    EncodingRun,
    Setting,
    encoding_rows,
    markdown,
    print_encodings,
    sweep_settings,
    write_encodings,
)
from sfprompt.sim.results import MethodResult, RoundRecord
from tests.bundles import SMALL_VIT


def _result(final: float, mb_up: float, mb_down: float) -> MethodResult:
    """Two rounds; bytes per device the same in both."""
    rounds = [
        RoundRecord(r, a, 1.0, mb_up * 1e6, mb_down * 1e6, 1.0, 10.0, 1.0)
        for r, a in ((1, 0.3), (2, final))
    ]
    return MethodResult("sfprompt", 5, rounds)


def _runs() -> list[EncodingRun]:
    """fp32, int8 and int8/fp16 over two seeds in IID, one seed under Dirichlet."""
    plan = {
        "fp32": [("iid", 0.80, 4.0, 4.0), ("iid", 0.84, 4.0, 4.0), ("dirichlet:0.1", 0.5, 4, 4)],
        "int8": [("iid", 0.78, 1.0, 1.0), ("iid", 0.80, 1.0, 1.0), ("dirichlet:0.1", 0.4, 1, 1)],
        "int8/fp16": [("iid", 0.82, 1.0, 2.0), ("iid", 0.84, 1.0, 2.0)],
    }
    return [
        EncodingRun(setting, partition, seed % 2, _result(final, up, down))
        for setting, runs in plan.items()
        for seed, (partition, final, up, down) in enumerate(runs)
    ]


VIT_BASE = {"fp32": (319.6e6, 0.466), "int8": (80.4e6, 0.117), "int8/fp16": (120.2e6, 0.175)}


def test_settings_by_name() -> None:
    assert Setting.parse("fp16") == Setting("fp16", "fp16")
    assert Setting.parse(" int8/fp16") == Setting("int8", "fp16")
    assert Setting.parse("int8/fp16").name == "int8/fp16"
    assert Setting.parse("bf16/bf16").name == "bf16"
    for bad in ("fp8", "int8/", "int8/fp16/fp32", ""):
        with pytest.raises(ValueError, match="unknown encoding setting"):
            Setting.parse(bad)
    names = [s.name for s in sweep_settings(["int8", "fp32", "fp16/fp16", "fp16"])]
    assert names == ["fp32", "int8", "fp16"]  # fp32 first, each once
    with pytest.raises(ValueError, match="fp4"):
        SimConfig(encodings=("fp16", "fp4/fp32"))


def test_rows_compare_each_setting_with_fp32_in_its_partition() -> None:
    rows = {(r.partition, r.setting): r for r in encoding_rows(_runs(), VIT_BASE)}
    assert len(rows) == 5
    ref = rows["iid", "fp32"]
    assert ref.seeds == 2 and ref.final_mean == pytest.approx(0.82) and ref.delta_points == 0
    int8 = rows["iid", "int8"]
    assert int8.final_mean == pytest.approx(0.79) and int8.delta_points == pytest.approx(-3.0)
    # sample stds 0.0283 and 0.0141: combined 3.16 points
    assert int8.delta_noise == pytest.approx(100 * (0.02**2 * 2 + 0.01**2 * 2) ** 0.5)
    assert (int8.mb_per_round, int8.mb_up, int8.mb_down) == pytest.approx((2.0, 1.0, 1.0))
    assert int8.bytes_vs_fp32 == pytest.approx(0.25)
    assert (int8.vit_base_mb, int8.vit_base_vs_fl_full) == pytest.approx((80.4, 0.117))
    mixed = rows["iid", "int8/fp16"]
    assert mixed.delta_points == pytest.approx(+1.0) and mixed.bytes_vs_fp32 == pytest.approx(0.375)
    skewed = rows["dirichlet:0.1", "int8"]
    assert skewed.seeds == 1 and skewed.final_std == 0 and skewed.delta_points == pytest.approx(-10)
    with pytest.raises(ValueError, match="no fp32 run"):
        encoding_rows([r for r in _runs() if r.setting != "fp32"], VIT_BASE)


def test_the_table_in_markdown_on_the_console_and_in_files(tmp_path: Path) -> None:
    rows = encoding_rows(_runs(), VIT_BASE)
    text = markdown(rows, "ViT-Base, 100 devices")
    assert text.startswith("## Encodings of activations and gradients")
    line = next(s for s in text.splitlines() if "| IID | int8/fp16 |" in s)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        "IID", "int8/fp16", "2", "83.0 ± 1.4", "+1.0 (noise 3.2)", "3", "1 / 2", "0.38x",
        "120.2", "0.175x",
    ]  # fmt: skip
    console = Console(record=True, width=200)
    print_encodings(rows, console)
    printed = console.export_text()
    assert "int8/fp16" in printed and "0.466x" in printed and "reference" in printed
    md, js, table = write_encodings(tmp_path, rows, _runs(), "ViT-Base, 100 devices")
    assert md.read_text() == text
    data = json.loads(js.read_text())
    assert len(data["rows"]) == 5 and len(data["runs"]) == 8
    assert data["runs"][0]["result"]["rounds"][-1]["accuracy"] == 0.80
    with table.open() as handle:
        read = list(csv.DictReader(handle))
    assert [(r["partition"], r["setting"]) for r in read][:3] == [
        ("iid", "fp32"), ("dirichlet:0.1", "fp32"), ("iid", "int8"),
    ]  # fmt: skip
    assert float(read[2]["delta_points"]) == pytest.approx(-3.0)
    assert "| Dirichlet alpha=0.1 | int8 | 1 | 40.0 ± 0.0 | -10.0 (1 seed) |" in text


def test_comparison_md_carries_the_section(tmp_path: Path) -> None:
    from tests.sim.test_comparison import _runs as seed_runs

    section = markdown(encoding_rows(_runs(), VIT_BASE), "ViT-Base")
    write_comparison(tmp_path, seed_runs(), [], {}, section)
    text = (tmp_path / "comparison.md").read_text()
    assert section.strip() in text and text.index("## Encodings") < text.index("## Gaps")


def test_a_setting_reaches_serve_as_its_options() -> None:
    from sfprompt.sim.pipeline import encoding_settings

    base = RoundConfig(rounds=2, seed=4)
    mixed = encoding_settings(base, Setting("int8", "fp16"))
    assert mixed == replace(base, encoding="int8", encoding_down="fp16")
    assert mixed.down_encoding == "fp16"
    same = encoding_settings(base, Setting("bf16", "bf16"))
    assert (same.encoding, same.encoding_down) == ("bf16", SAME_ENCODING)


# ---- bytes at the paper's scale -------------------------------------------------------------


def test_scale_bytes_follow_each_direction() -> None:
    """On a small ViT (the paper's is counted the same way): each direction in its encoding."""
    from sfprompt.export.config import ExportConfig
    from sfprompt.sim.paper_scale import PaperScale, PaperScaleModel

    cut = ExportConfig(
        model="vit_tiny_patch16_224", model_args=dict(SMALL_VIT), num_classes=10, prompts=4, batch=8
    )
    scale = PaperScale(cut, images=200)
    assert scale.samples == 2 and "200 images over 100 devices" in scale.describe()
    model = PaperScaleModel(replace(scale, clients=4))
    fp32, int8 = model.round_bytes("fp32"), model.round_bytes("int8")
    mixed = model.round_bytes("int8", "fp32")
    assert mixed.sfprompt.up_split == int8.sfprompt.up_split
    assert mixed.sfprompt.down_split == fp32.sfprompt.down_split
    assert fp32.fl_full == int8.fl_full and fp32.fl_full.up_model == fp32.fl_full.down_model
    assert fp32.vs_fl_full == pytest.approx(fp32.sfprompt.total / fp32.fl_full.total)
    assert int8.vs_fl_full < mixed.vs_fl_full < fp32.vs_fl_full


@pytest.mark.slow
def test_the_paper_scale_in_fp32_is_the_documented_ratio() -> None:
    """ViT-Base, 100 devices of 500 images, gamma 0.5: 0.466x FL full fine-tuning, as
    docs/simulation.md's table (bench/bench_comm.py, from an exported bundle) gives it."""
    from sfprompt.sim.paper_scale import PaperScaleModel

    model = PaperScaleModel()
    fp32, fp16 = model.round_bytes("fp32"), model.round_bytes("fp16")
    assert round(fp32.sfprompt.total / 1e6, 1) == 319.7 and round(fp32.vs_fl_full, 3) == 0.466
    assert round(fp32.fl_full.total / 1e6, 1) == 686.5
    assert round(fp16.sfprompt.total / 1e6, 1) == 159.9
