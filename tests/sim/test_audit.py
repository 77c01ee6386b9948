"""The leakage audit (sim/audit.py): its settings, its run on a real exported bundle, its files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.edge_client.defenses import Defense
from sfprompt.sim.audit import AuditResult, AuditRow, mean_std, run_audit, run_federations
from sfprompt.sim.audit_report import findings, markdown, paired_gap, write_audit
from sfprompt.sim.audit_settings import check_specs, parse_setting
from sfprompt.sim.config import SimConfig
from sfprompt.sim.datasets import SimData
from sfprompt.sim.results import MethodResult, RoundRecord
from sfprompt.units import MB

# ------------------------------------------------------------------------------ settings


def test_settings_parse_into_the_devices_defense() -> None:
    assert parse_setting("none", 40.0).defense == Defense()
    assert parse_setting("clip", 40.0).defense == Defense(clip=40.0)
    assert parse_setting("clip=12.5", 40.0).defense == Defense(clip=12.5)
    assert parse_setting("noise=0.1", 40.0).defense == Defense(clip=40.0, noise=0.1)
    combined = parse_setting("clip+noise=0.03+grad-noise=32+max-norm", 7.0)
    assert combined.defense == Defense(7.0, 0.03, 32.0, True)
    assert combined.name == "clip+noise=0.03+grad-noise=32+max-norm"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("clip+noize=1", "unknown audit setting part 'noize=1'"),
        ("grad-noise", "unknown audit setting part 'grad-noise'"),
        ("noise=-1", "'noise=-1': needs a finite number >= 0"),
        ("clip=0", "'clip=0': needs a finite number > 0"),
        ("clip=nan", "needs a finite number"),
    ],
)
def test_bad_settings_are_named(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("+", r"\+")):
        parse_setting(spec, 40.0)


def test_accuracy_runs_must_be_audited_settings() -> None:
    with pytest.raises(ValueError, match="not in --audit-settings"):
        check_specs(("none",), ("none", "clip"))


def test_sim_config_checks_the_audit_only_when_asked() -> None:
    SimConfig(audit_settings=("bogus",))  # not audited: not checked
    with pytest.raises(ValueError, match="unknown audit setting part 'bogus'"):
        SimConfig(audit=True, audit_settings=("bogus",))
    with pytest.raises(ValueError, match="add sfprompt to --methods"):
        SimConfig(audit=True, methods=("fl_full",))
    with pytest.raises(ValueError, match="--audit-steps"):
        SimConfig(audit=True, audit_steps=0)


# ------------------------------------------------------------------- on a real bundle


def synthetic_data(count: int = 40, classes: int = 7) -> SimData:
    """Grey 32 x 32 images (the size of the tests' small ViT), blobs on black."""
    rng = np.random.default_rng(0)
    i, j = np.mgrid[0:32, 0:32]
    images = np.zeros((count, 32, 32, 3), np.uint8)
    for n in range(count):
        ci, cj = rng.uniform(6, 26, 2)
        blob = np.exp(-((i - ci) ** 2 + (j - cj) ** 2) / 40.0)
        images[n] = (255 * blob)[..., None].astype(np.uint8)
    labels = rng.integers(0, classes, count)
    half = count // 2
    names = [str(c) for c in range(classes)]
    return SimData("synthetic", images[:half], labels[:half], images[half:], labels[half:], names)


def test_audit_runs_the_attacks_on_a_real_bundle(exported_cases, tmp_path: Path) -> None:  # noqa: ANN001
    """The eager split model of an exported bundle, three settings, no federation: labels are
    exact without a defense and the images come back better than under heavy noise."""
    bundle = exported_cases["token_m0"].result.server_dir
    cfg = SimConfig(
        data="synthetic",  # no pre-training classes: the public set is the test set alone
        methods=("sfprompt",),
        audit=True,
        audit_settings=("none", "clip+noise=1", "grad-noise=64"),
        audit_accuracy=(),
        audit_images=8,
        audit_steps=60,
        audit_decoder_epochs=2,
        batch_size=4,
    )
    data = synthetic_data()

    def no_federation(*_: object) -> None:
        raise AssertionError("no setting asked for a federation")

    result = run_audit(cfg, data, bundle, np.arange(20), None, no_federation, tmp_path)  # type: ignore[arg-type]
    rows = {r.setting: r for r in result.rows}
    assert rows["none"].label_accuracy == 1.0
    assert rows["none"].inversion_ssim > rows["clip+noise=1"].inversion_ssim + 0.2
    assert rows["grad-noise=64"].inversion_ssim == rows["none"].inversion_ssim  # same h sent
    assert rows["none"].accuracy is None and rows["none"].chance == pytest.approx(1 / 7)
    shown = data.train_labels[:8]
    assert rows["none"].majority == pytest.approx(np.bincount(shown).max() / 8)
    assert result.public_images == 20 and "initial" in result.params_from
    assert result.inversions["none"].shape == (6, 32, 32)

    files = write_audit(tmp_path / "report", result)
    assert [f.name for f in files] == ["audit.md", "audit.json", "audit.csv", "audit.png"]
    saved = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert [r["setting"] for r in saved["rows"]] == ["none", "clip+noise=1", "grad-noise=64"]
    with (tmp_path / "report" / "audit.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 3
    text = markdown(result, level=2)
    assert text.startswith("## Leakage audit") and "| `clip+noise=1` | not run |" in text


# ------------------------------------------------------------------- seeds and error bars


def test_mean_std_is_the_sample_std() -> None:
    mean, std = mean_std([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)  # ddof=1, not 0.0816
    assert mean_std([0.42]) == (pytest.approx(0.42), 0.0)


def finished(accuracy: float, mb: float) -> MethodResult:
    """A federation's result as run_split returns it: two rounds, the last one's accuracy."""
    rounds = [
        RoundRecord(r, acc, 1.0, mb * MB / 2, mb * MB / 2, 0.0, 0.0, 1.0)
        for r, acc in ((1, 0.1), (2, accuracy))
    ]
    return MethodResult("sfprompt", 5, rounds)


def test_accuracy_federations_run_once_per_seed_for_every_setting(tmp_path: Path) -> None:
    """Each setting of --audit-accuracy federates at every seed of --seeds (the same ones:
    paired), with its own defense and run folder; the row gets mean, std and each seed's."""
    cfg = SimConfig(seed=3, seeds=3, audit_accuracy=("none", "clip+noise=0.1"))
    settings = [parse_setting(s, 40.0) for s in ("none", "clip+noise=0.1", "grad-noise=8")]
    finals = {("none", 3): 0.5, ("none", 4): 0.6, ("none", 5): 0.7}
    finals |= {("clip+noise=0.1", 3): 0.3, ("clip+noise=0.1", 4): 0.5, ("clip+noise=0.1", 5): 0.4}
    calls = []

    def federate(rounds: RoundConfig, run_dir: Path, seed: int) -> MethodResult:
        name = "none" if rounds.defense_clip is None else "clip+noise=0.1"
        calls.append((name, seed, rounds.defense_noise, run_dir))
        return finished(finals[name, seed], mb=2.0 if name == "none" else 3.0)

    runs = run_federations(settings, cfg, RoundConfig(), federate, tmp_path, lambda _: None)
    assert [(c[0], c[1]) for c in calls] == list(finals)  # grad-noise=8 was not asked for
    assert [c[2] for c in calls] == [0.0] * 3 + [0.1] * 3
    assert len({c[3] for c in calls}) == 6  # a run folder per setting and seed
    assert runs["none"].seeds == runs["clip+noise=0.1"].seeds == [3, 4, 5]

    row = AuditRow("clip+noise=0.1", "d", 0.1, 9.0, 0.2, 10.0, 0.3, 0.2, 0.2, 0.25)
    runs["clip+noise=0.1"].fill(row)
    assert row.accuracy == pytest.approx(0.4) and row.accuracy_std == pytest.approx(0.1)
    assert row.accuracy_runs == [0.3, 0.5, 0.4] and row.seeds == [3, 4, 5]
    assert row.mb_per_round == pytest.approx(3.0)


def seeded_row(
    setting: str, defense: str, runs: list[float], ssim: float, labels: float
) -> AuditRow:
    mean, std = mean_std(runs)
    row = AuditRow(setting, defense, ssim, 10.0, ssim, 11.0, labels, 0.3, 0.2, 0.28)
    row.accuracy, row.accuracy_std, row.accuracy_runs, row.seeds = mean, std, runs, [0, 1, 2]
    row.mb_per_round = 2.17
    return row


def test_report_gives_mean_std_and_the_paired_gap(tmp_path: Path) -> None:
    plain = seeded_row("none", "none", [0.5, 0.6, 0.7], ssim=0.9, labels=1.0)
    defended = seeded_row("clip+noise=0.3", "noisy", [0.3, 0.5, 0.4], ssim=0.1, labels=0.25)
    gap = paired_gap(defended, plain)
    assert gap is not None
    assert gap[0] == pytest.approx(-0.2) and gap[1] == pytest.approx(0.1) and gap[2] == 3
    blank = np.zeros((2, 8, 8))
    result = AuditResult(
        [plain, defended], blank, {"none": blank, "clip+noise=0.3": blank},
        {"none": blank, "clip+noise=0.3": blank}, 39.0, "the test's rows", 20,
    )  # fmt: skip
    text = markdown(result)
    assert "| `none` | 60.0 ± 10.0 |" in text and "| `clip+noise=0.3` | 40.0 ± 10.0 |" in text
    assert "seeds 0, 1, 2 (n = 3)" in text and "| 0.20 / 0.28 |" in text
    found = " ".join(findings(result))
    assert "40.0 ± 10.0% against 60.0 ± 10.0% undefended" in found
    assert "paired over 3 seeds: -20.0 ± 10.0 points" in found

    write_audit(tmp_path, result)
    saved = json.loads((tmp_path / "audit.json").read_text())["rows"][1]
    assert saved["accuracy_runs"] == [0.3, 0.5, 0.4] and saved["seeds"] == [0, 1, 2]
    assert saved["accuracy"] == pytest.approx(0.4)
    with (tmp_path / "audit.csv").open() as handle:
        second = list(csv.DictReader(handle))[1]
    assert second["seeds"] == "0;1;2" and second["accuracy_runs"] == "0.3;0.5;0.4"
    assert float(second["accuracy_std"]) == pytest.approx(0.1)
