"""bench/bench_fleet.py's arithmetic: which steps count, what is served, which part is named the
first bottleneck, and how a py-spy dump is read (the run itself is the bench's, not a test's)."""

from __future__ import annotations

import pytest

from bench.fleet_monitor import ThreadSampler
from bench.fleet_report import Window, bottleneck, step_figures


def test_steps_due_in_the_window_count_and_those_ended_in_it_were_served() -> None:
    window = Window(10.0, 20.0)
    records = [
        # due, started, forward_s, total_s, busy, error, slots missed
        [5.0, 5.0, 0.01, 0.02, 0, None, 0],  # warm-up: not counted
        [9.5, 9.5, 0.5, 1.0, 0, None, 0],  # due before the window, served in it
        [10.0, 10.0, 0.05, 0.1, 0, None, 0],
        [12.0, 12.0, 0.05, 0.3, 2, None, 0],  # two busy refusals retried, then served
        [14.0, 14.0, None, 4.5, 0, "unknown_step", 2],  # failed after overrunning 2 slots
        [19.9, 19.9, 0.05, 0.2, 0, None, 0],  # due in the window, ends after it
        [20.0, 20.0, 0.05, 0.1, 0, None, 0],  # due after the window
    ]
    figures = step_figures(records, window, devices=4, period_s=2.0)
    assert figures["steps"] == 4
    assert figures["failed_steps"] == 1
    assert figures["failures"] == {"unknown_step": 1}
    assert figures["served_steps_per_s"] == pytest.approx(3 / 10)  # ended in the window
    assert figures["offered_steps_per_s"] == pytest.approx(2.0)
    assert figures["busy_retries"] == 2
    assert figures["missed_pct"] == pytest.approx(100 * 2 / 6)  # of 4 steps + 2 missed slots
    assert figures["latency_ms"]["p50"] == pytest.approx(200.0)  # of 100, 300 and 200 ms


def row(**changes: object) -> dict:
    base = {
        "devices": 100,
        "cores": 2,
        "period_s": 10.0,
        "offered_steps_per_s": 10.0,
        "served_steps_per_s": 10.0,
        "failed_steps": 0,
        "missed_pct": 0.0,
        "latency_ms": {"p99": 50.0},
        "server": {"cpu_pct": 40.0, "top_thread_pct": 30.0},
        "broker": {"cpu_pct": 20.0},
        "generators": {"cpu_pct": 10.0, "top_process_pct": 10.0},
        "machine_busy_pct": 40.0,
        "others_cpu_pct": 10.0,
        "bench_cpu_pct": 70.0,
        "cpu_left_pct": 190.0,
        "body_ceiling_steps_per_s": None,
    }
    return {**base, **changes}


def test_the_part_nearest_its_ceiling_is_named_and_projected() -> None:
    verdict = bottleneck(row(server={"cpu_pct": 120.0, "top_thread_pct": 80.0}))
    assert verdict["component"] == "server thread"
    assert verdict["utilisation"] == pytest.approx(0.8)
    assert verdict["ceiling_steps_per_s"] == pytest.approx(12.5)  # 10 steps/s at 80%
    assert verdict["projected_devices_at_ceiling"] == 125  # at a step per 10 s
    assert not verdict["saturated"]


def test_a_fleet_served_below_its_offered_rate_is_saturated() -> None:
    verdict = bottleneck(row(served_steps_per_s=6.0, broker={"cpu_pct": 99.0}))
    assert verdict["component"] == "broker"
    assert verdict["ceiling_steps_per_s"] == pytest.approx(6.1, abs=0.05)
    assert verdict["saturated"]


DUMP = """Process 100: python serve
Python v3.11.7 (/usr/bin/python3.11)

Thread 100 (idle): "MainThread"
    wait (threading.py:320)
Thread 101 (active+gil): "paho-mqtt-client-server"
    decode (codec.py:300)
    _on_message (transport.py:320)
Thread 102 (active): "sfprompt-body-batcher"
    body_vjp (body_model.py:170)
"""


def test_a_py_spy_dump_names_threads_their_frames_and_the_gil_holder() -> None:
    sampler = ThreadSampler("py-spy", 100)
    sampler.add_dump(DUMP)
    sampler.add_dump(DUMP.replace("(active+gil)", "(idle)"))
    busiest = sampler.busiest({101: 30.0, 102: 90.0, 103: 5.0}, top=3)
    assert [t["name"] for t in busiest[:2]] == ["sfprompt-body-batcher", "paho-mqtt-client-server"]
    assert busiest[0]["frame"] == "body_vjp (body_model.py:170)"
    assert busiest[1]["gil_pct"] == pytest.approx(50.0)
    assert busiest[1]["frame"] == "decode (codec.py:300)"  # the innermost frame only
    assert busiest[2]["name"].startswith("(native")  # never seen by a dump
    assert sampler.gil_pct == pytest.approx(50.0)
