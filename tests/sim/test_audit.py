"""The leakage audit (sim/audit.py): its settings, its run on a real exported bundle, its files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sfprompt.edge_client.defenses import Defense
from sfprompt.sim.audit import run_audit
from sfprompt.sim.audit_report import markdown, write_audit
from sfprompt.sim.audit_settings import check_specs, parse_setting
from sfprompt.sim.config import SimConfig
from sfprompt.sim.datasets import SimData

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
