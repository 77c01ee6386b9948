"""`sfprompt-edge profile --out`: the JSON always, the PNG timeline only where matplotlib is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sfprompt.edge_client.memory import PhaseStats
from sfprompt.edge_client.profile import ProfileResult, write_report


def a_profile() -> ProfileResult:
    phases = {"head_forward": PhaseStats("head_forward", peak_rss_mb=120.0, calls=2)}
    timeline = [(0.0, 100.0, "head_forward"), (0.1, 120.0, "head_forward")]
    return ProfileResult(phases=phases, timeline=timeline, micro_batch=4)


def test_without_matplotlib_the_json_is_written_and_the_plot_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    written = write_report(a_profile(), tmp_path)
    assert written == [tmp_path / "profile.json"]
    assert json.loads((tmp_path / "profile.json").read_text())["peak_rss_mb"] == 120.0
    assert not (tmp_path / "memory_timeline.png").exists()


def test_with_matplotlib_the_timeline_is_drawn_too(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = write_report(a_profile(), tmp_path)
    assert written == [tmp_path / "profile.json", tmp_path / "memory_timeline.png"]
    assert (tmp_path / "memory_timeline.png").stat().st_size > 0
    assert "files" not in json.loads((tmp_path / "profile.json").read_text())
