"""Metrics: JSON lines round-trip, a torn last line is skipped and cut before the next append,
damage elsewhere is refused; the Prometheus endpoint serves what observe() was given."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sfprompt.cloud_server.metrics import MetricsLog, PrometheusExporter, RoundMetrics


def _metrics(round: int = 1, accuracy: float | None = 0.8125) -> RoundMetrics:
    return RoundMetrics(
        round=round,
        accuracy=accuracy,
        loss=0.5,
        seconds=12.25,
        devices={
            "cam-01": {
                "samples": 40,
                "bytes_up_split": 1000,
                "bytes_down_split": 400,
                "bytes_down_task": 50,
                "bytes_up_update": 7,
                "peak_rss_mb": 81.5,
                "local_loss": 1.25,
            },
            "cam-02": {"samples": 10, "bytes_up_split": 24, "bytes_up_update": 7},
        },
        selected=["cam-01", "cam-02", "cam-03"],
        accepted=["cam-01", "cam-02"],
        rejected=[("cam-03", "late")],
    )


def test_json_lines_round_trip_and_append_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first, second, third = _metrics(1), _metrics(2, accuracy=None), _metrics(3)
    with MetricsLog(path) as log:
        log.write(first)
        log.write(second)
    with MetricsLog(path) as log:  # a restarted server appends
        log.write(third)
    records = MetricsLog.read(path)
    assert [RoundMetrics.from_dict(r) for r in records] == [first, second, third]
    assert records[0]["rejected"] == [["cam-03", "late"]]
    assert path.read_text().count("\n") == 3
    assert json.loads(path.read_text().splitlines()[1])["accuracy"] is None


def test_torn_last_line_is_skipped_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        log.write(_metrics(1))
        log.write(_metrics(2))
    whole = json.dumps(_metrics(3).to_dict())
    with open(path, "a", encoding="utf-8") as file:
        file.write(whole[: len(whole) // 2])  # the crash: half a line, no newline
    assert [r["round"] for r in MetricsLog.read(path)] == [1, 2]
    with open(path, "a", encoding="utf-8") as file:
        file.write(whole[len(whole) // 2 :])  # even complete JSON without its newline is torn
    assert [r["round"] for r in MetricsLog.read(path)] == [1, 2]
    with MetricsLog(path) as log:
        log.write(_metrics(4))
    assert [r["round"] for r in MetricsLog.read(path)] == [1, 2, 4]


def test_torn_only_line_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "acc')
    assert MetricsLog.read(path) == []
    with MetricsLog(path) as log:
        log.write(_metrics(2))
    assert [r["round"] for r in MetricsLog.read(path)] == [2]


def test_damage_before_the_last_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "acc\n{"round": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not JSON"):
        MetricsLog.read(path)
    path.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2: expected an object"):
        MetricsLog.read(path)


def test_from_dict_names_a_missing_field() -> None:
    data = _metrics().to_dict()
    del data["seconds"]
    with pytest.raises(ValueError, match="'seconds' is missing"):
        RoundMetrics.from_dict(data)


def test_bytes_are_summed_by_direction_and_phase() -> None:
    assert _metrics().bytes_by_phase() == {
        ("up", "split"): 1024.0,
        ("down", "split"): 400.0,
        ("down", "task"): 50.0,
        ("up", "update"): 14.0,
    }


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_endpoint_serves_observed_values() -> None:
    exporter = PrometheusExporter(0)
    other = PrometheusExporter(0)  # own registries: a second exporter does not collide
    try:
        assert exporter.port != other.port and exporter.port > 0
        exporter.observe(_metrics(1))
        exporter.observe(_metrics(2, accuracy=None))  # no evaluation: accuracy keeps 0.8125
        exporter.set_online(5)
        values = _scrape(exporter.port)
        assert values[("sfprompt_round", ())] == 2
        assert values[("sfprompt_accuracy", ())] == 0.8125
        assert values[("sfprompt_loss", ())] == 0.5
        assert values[("sfprompt_devices_online", ())] == 5
        assert values[("sfprompt_devices_accepted", ())] == 2
        up_split = (("direction", "up"), ("phase", "split"))
        assert values[("sfprompt_bytes_total", up_split)] == 2 * 1024
        down_task = (("direction", "down"), ("phase", "task"))
        assert values[("sfprompt_bytes_total", down_task)] == 2 * 50
        assert values[("sfprompt_updates_rejected_total", (("reason", "late"),))] == 2
        assert values[("sfprompt_round_seconds_count", ())] == 2
        assert values[("sfprompt_round_seconds_sum", ())] == 2 * 12.25
        assert ("sfprompt_round", ()) in _scrape(other.port)
        assert _scrape(other.port)[("sfprompt_round", ())] == 0  # untouched by the first
    finally:
        exporter.close()
        other.close()
    with pytest.raises(urllib.error.URLError):
        _scrape(exporter.port)


def test_robust_aggregation_fields_round_trip_and_default_for_old_records() -> None:
    m = _metrics()
    m.aggregation, m.model_refused, m.excluded = "trimmed-mean", "its norm grew", ["evil"]
    assert RoundMetrics.from_dict(m.to_dict()) == m
    old = _metrics().to_dict()
    for name in ("aggregation", "model_refused", "excluded"):
        del old[name]  # a log written before robust aggregation
    back = RoundMetrics.from_dict(old)
    assert (back.aggregation, back.model_refused, back.excluded) == ("", "", [])


def test_prometheus_counts_refused_models_and_excluded_devices() -> None:
    exporter = PrometheusExporter(0)
    try:
        refused = _metrics(1)
        refused.model_refused, refused.excluded = "prompt.tokens is not finite", ["evil"]
        exporter.observe(refused)
        exporter.observe(_metrics(2))
        values = _scrape(exporter.port)
        assert values[("sfprompt_models_refused_total", ())] == 1
        assert values[("sfprompt_devices_excluded", ())] == 0  # the latest round's list
    finally:
        exporter.close()
