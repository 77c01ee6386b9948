"""Device memory of the in-process baselines is the peak RSS of a real torch process playing one
device, measured as the split devices measure theirs: a positive figure, above what importing
torch alone costs, the same in every round, marked measured; and the methods' footprints order
as what their devices hold and train says they must (on a model big enough to tell)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sfprompt.export.cut_manifest import preprocess_config
from sfprompt.sim.baselines import BaselineConfig
from sfprompt.sim.device_memory import DeviceMemory, ModelSpec, measure_device_memory
from sfprompt.sim.run_baseline import MEMORY_NOTE, run_baseline
from tests.sim.test_baselines import CLASSES, CUT, PREPROCESS, TINY, digits_like

SPEC = ModelSpec("vit_tiny_patch16_224", CLASSES, model_args=dict(TINY), seed=0)
# Wide enough that a weight's gradient and momentum (2 x 41 MB here) stand far above the few MB
# by which two processes' RSS differ; still a few seconds on one thread.
WIDE = ModelSpec(
    "vit_tiny_patch16_224",
    CLASSES,
    model_args={**TINY, "embed_dim": 384, "num_heads": 6, "depth": 6},
    seed=0,
)
TORCH_ONLY = """
import json, torch
from sfprompt.edge_client.memory import MemoryProfiler
with MemoryProfiler(interval_s=0.02) as profiler:
    with profiler.phase("imported"):
        pass
print(json.dumps(profiler.profile.peak_rss_mb))
"""


def torch_import_floor_mb() -> float:
    """The peak RSS of a process that only imports torch, sampled by the same profiler."""
    done = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY], capture_output=True, text=True, check=True
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def measure(method: str, spec: ModelSpec = WIDE) -> DeviceMemory:
    vit = spec()
    return measure_device_memory(
        method,
        spec,
        vit,
        CUT,
        digits_like(48, 1),
        preprocess_config(vit),
        batch_size=16,
        lr=0.01,
        local_epochs=1,
        seed=0,
    )


@pytest.mark.slow
def test_fl_full_device_peak_is_measured_above_the_torch_floor_in_every_round() -> None:
    shards = [digits_like(24, 1), digits_like(24, 2)]
    cfg = BaselineConfig(rounds=2, batch_size=8)
    result, _ = run_baseline("fl_full", SPEC, PREPROCESS, shards, digits_like(8, 3), cfg, CUT)
    peaks = {r.device_peak_mb for r in result.rounds}
    assert len(peaks) == 1  # measured once; a device's footprint is the same every round
    (peak,) = peaks
    assert peak > torch_import_floor_mb() > 0
    assert all(r.measured["memory"] is True for r in result.rounds)
    assert MEMORY_NOTE in result.notes
    assert not any("estimate" in note for note in result.notes)


@pytest.mark.slow
def test_footprints_follow_what_each_device_holds_and_trains() -> None:
    full, prompt, sfl = (measure(m) for m in ("fl_full", "fl_prompt", "sfl"))
    assert all(m.batches == 3 for m in (full, prompt, sfl))  # 48 samples, batches of 16
    # fl_full and fl_prompt hold the same model; fl_full adds a gradient and momentum for
    # every weight (two copies of them: at least one must show).
    assert full.held_mb == pytest.approx(prompt.held_mb, rel=0.01)
    assert full.trained_mb == full.held_mb and prompt.trained_mb < 0.01 * prompt.held_mb
    assert full.peak_rss_mb - prompt.peak_rss_mb > full.held_mb
    # The SFL device never holds the body (five of six blocks): less than the whole model.
    assert sfl.held_mb < 0.3 * full.held_mb
    assert sfl.peak_rss_mb < prompt.peak_rss_mb


@pytest.mark.slow
def test_a_failing_device_process_names_the_method() -> None:
    vit = SPEC()
    wrong = ModelSpec("not_a_timm_model", CLASSES, model_args=dict(TINY))
    with pytest.raises(RuntimeError, match=r"(?s)^fl_prompt: .*not_a_timm_model"):
        measure_device_memory(
            "fl_prompt",
            wrong,
            vit,
            CUT,
            digits_like(8, 1),
            PREPROCESS,
            batch_size=4,
            lr=0.01,
            local_epochs=1,
            seed=0,
        )


def test_bad_requests_are_refused_before_any_process_starts() -> None:
    with pytest.raises(ValueError, match="sfprompt"):
        measure("sfprompt", SPEC)
    cfg = BaselineConfig(rounds=1)
    shards, test = [digits_like(8, 1)], digits_like(8, 2)
    with pytest.raises(TypeError, match="ModelSpec"):
        run_baseline("fl_full", lambda: SPEC(), PREPROCESS, shards, test, cfg, CUT)  # type: ignore[arg-type]
