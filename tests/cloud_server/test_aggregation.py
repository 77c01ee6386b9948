"""Robust aggregation: each rule against a hand computation, the bounds (norm, samples, clip,
new-model check), the refusal counter, and a 1e30 update with 10^9 samples that cannot move the
result beyond the honest updates under any rule."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from sfprompt.cloud_server import aggregation
from sfprompt.cloud_server.aggregation import (
    AggregationConfig,
    RefusalTracker,
    aggregate,
    capped_samples,
    check_global,
    clip_update,
    coordinate_median,
    trim_count,
    trimmed_mean,
)
from sfprompt.cloud_server.fedavg import (
    LATE,
    TOO_LARGE,
    Params,
    RoundInbox,
    UpdateRejected,
    check_update,
)
from sfprompt.cloud_server.rounds import RoundConfig

P = "prompt.tokens"
B = "tail.head.bias"


def _f32(values: list) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _old() -> Params:
    return {P: _f32([[0.0, 2.0]]), B: _f32([1.0, -1.0])}


def _clients(*rows: tuple[list, list]) -> list[Params]:
    return [{P: _f32([prompt]), B: _f32(bias)} for prompt, bias in rows]


# Five clients; per coordinate, sorted values are in the comments.
FIVE = _clients(
    ([1.0, 0.0], [5.0, 0.0]),
    ([2.0, 9.0], [1.0, 0.0]),
    ([3.0, 1.0], [2.0, 7.0]),
    ([4.0, 2.0], [3.0, 1.0]),
    ([100.0, 3.0], [4.0, 2.0]),
)  # prompt[0]: 1 2 3 4 100; prompt[1]: 0 1 2 3 9; bias[0]: 1 2 3 4 5; bias[1]: 0 0 1 2 7


def test_median_equals_hand_computation() -> None:
    new = coordinate_median(_old(), FIVE)
    np.testing.assert_array_equal(new[P], _f32([[3.0, 2.0]]))
    np.testing.assert_array_equal(new[B], _f32([3.0, 1.0]))
    half = coordinate_median(_old(), FIVE, server_lr=0.5)  # old + (median - old) / 2
    np.testing.assert_array_equal(half[P], _f32([[1.5, 2.0]]))
    np.testing.assert_array_equal(half[B], _f32([2.0, 0.0]))
    even = coordinate_median(_old(), FIVE[:4])  # 1 2 3 4 -> 2.5; 0 1 2 9 -> 1.5
    np.testing.assert_array_equal(even[P], _f32([[2.5, 1.5]]))


def test_trimmed_mean_equals_hand_computation() -> None:
    new = trimmed_mean(_old(), FIVE, 0.2)  # drop 1 at each end, average the middle 3
    np.testing.assert_allclose(new[P], _f32([[3.0, 2.0]]))  # (2+3+4)/3, (1+2+3)/3
    np.testing.assert_allclose(new[B], _f32([3.0, 1.0]))  # (2+3+4)/3, (0+1+2)/3
    untrimmed = trimmed_mean(_old(), FIVE, 0.0)  # the plain unweighted mean
    np.testing.assert_allclose(untrimmed[P], _f32([[22.0, 3.0]]))
    four = trimmed_mean(_old(), FIVE[:4], 0.2)  # ceil(0.8) = 1: the middle two of four
    np.testing.assert_allclose(four[P], _f32([[2.5, 1.5]]))
    np.testing.assert_allclose(four[B], _f32([2.5, 0.5]))  # 1 2 3 5; 0 0 1 7


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(1, 0.2, 0), (2, 0.2, 0), (3, 0.2, 1), (4, 0.2, 1), (5, 0.2, 1), (10, 0.2, 2), (10, 0.3, 3),
     (6, 0.0, 0), (11, 0.49, 5), (4, 0.49, 1)],
)  # fmt: skip
def test_trim_count_trims_one_from_three_and_always_leaves_one(
    n: int, fraction: float, k: int
) -> None:
    assert trim_count(n, fraction) == k


def test_rules_do_not_depend_on_the_order_of_the_updates() -> None:
    rng = np.random.default_rng(0)
    old = {P: rng.standard_normal((3, 4)).astype(np.float32)}
    ups = [{P: rng.standard_normal((3, 4)).astype(np.float32)} for _ in range(6)]
    for rule in (lambda u: coordinate_median(old, u), lambda u: trimmed_mean(old, u, 0.2)):
        np.testing.assert_array_equal(rule(ups)[P], rule(ups[::-1])[P])


def test_chunked_coordinates_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    old = {P: rng.standard_normal((7, 5)).astype(np.float32)}
    ups = [{P: rng.standard_normal((7, 5)).astype(np.float32)} for _ in range(5)]
    whole = trimmed_mean(old, ups, 0.2)
    monkeypatch.setattr(aggregation, "CHUNK_BYTES", 8 * 5 * 3)  # three coordinates a chunk
    np.testing.assert_array_equal(trimmed_mean(old, ups, 0.2)[P], whole[P])
    np.testing.assert_array_equal(
        coordinate_median(old, ups)[P], np.median(np.stack([u[P] for u in ups]), axis=0)
    )


def test_clip_scales_the_change_down_and_leaves_small_ones() -> None:
    old = {P: _f32([[1.0, 1.0]])}
    big = {P: _f32([[4.0, 5.0]])}  # change (3, 4): norm 5
    clipped, norm = clip_update(old, big, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped[P], _f32([[1.6, 1.8]]))  # old + (0.6, 0.8)
    assert clipped[P].dtype == np.float32
    same, norm = clip_update(old, big, 10.0)
    assert same is big and norm == 5.0


@pytest.mark.parametrize(
    ("samples", "cap", "reported", "weight"),
    [
        (10**9, 10_000, None, 10_000),  # the server's cap
        (10**9, 10_000, 1e9, 10_000),  # a liar lies in both fields: still the server's cap
        (10**9, 10_000, 48.0, 48),  # no more than the local data the device reported
        (24, 10_000, 48.0, 24),  # an honest claim is untouched
        (24, 10_000, math.nan, 24),  # a meaningless report is ignored
        (24, 10_000, 0.0, 24),
    ],
)
def test_samples_are_capped_by_the_server(
    samples: int, cap: int, reported: float | None, weight: int
) -> None:
    assert capped_samples(samples, cap, reported) == weight


def test_update_too_large_is_refused_naming_norm_and_bound() -> None:
    old = {P: _f32([[0.0, 0.0]])}
    assert check_update(old, {P: _f32([[3.0, 4.0]])}, 1, max_norm=5.0) == 5.0
    with pytest.raises(UpdateRejected, match=r"changes the model by 1.414e\+30.*bound 1000") as c:
        check_update(old, {P: _f32([[1e30, 1e30]])}, 10**9, max_norm=1000.0)
    assert c.value.reason == TOO_LARGE


def test_inbox_refuses_a_too_large_update_and_counts_it_as_content() -> None:
    inbox = RoundInbox(2, {"a", "b", "c"}, _old(), time.monotonic() + 10, max_update_norm=100.0)
    poisoned = {k: np.full_like(v, 1e30) for k, v in _old().items()}
    with pytest.raises(UpdateRejected, match="too_large"):
        inbox.offer("a", 2, poisoned, 10**9)
    inbox.offer("b", 2, _old(), 3)
    inbox.close()
    with pytest.raises(UpdateRejected, match="late"):
        inbox.offer("c", 2, _old(), 3)
    assert inbox.rejected == [("a", TOO_LARGE), ("c", LATE)]
    assert inbox.refused_for_content() == {"a"}  # late is the network, not the update
    assert set(inbox.accepted) == {"b"}


HONEST = _clients(([1.0, 2.0], [1.0, -1.0]), ([2.0, 3.0], [0.5, -2.0]), ([0.0, 2.5], [1.5, 0.0]))
LOW = np.minimum.reduce([np.concatenate([h[P].ravel(), h[B]]) for h in HONEST])
HIGH = np.maximum.reduce([np.concatenate([h[P].ravel(), h[B]]) for h in HONEST])


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_a_1e30_update_with_1e9_samples_stays_within_the_honest_ones(rule: str) -> None:
    """Even with the norm bound off, the robust rules keep every coordinate between the
    smallest and largest honest value."""
    poisoned = {k: np.full_like(v, 1e30) for k, v in _old().items()}
    updates = {f"h{i}": (h, 24) for i, h in enumerate(HONEST)} | {"evil": (poisoned, 10**9)}
    cfg = AggregationConfig(rule=rule, max_update_norm=math.inf)
    result = aggregate(_old(), updates, cfg)
    assert not result.refused
    flat = np.concatenate([result.params[P].ravel(), result.params[B]])
    assert np.all(flat >= LOW) and np.all(flat <= HIGH), flat
    assert result.weights["evil"] == 10_000
    assert result.norms["evil"] > 1e30


def test_fedavg_with_clipping_moves_at_most_the_clip_norm_towards_the_attacker() -> None:
    poisoned = {k: np.full_like(v, 1e30) for k, v in _old().items()}
    updates = {f"h{i}": (h, 24) for i, h in enumerate(HONEST)} | {"evil": (poisoned, 10**9)}
    cfg = AggregationConfig(clip_norm=1.0, max_update_norm=math.inf)
    result = aggregate(_old(), updates, cfg)
    assert result.clipped == ["evil", "h1", "h2"]  # changes 1e30, 2.5, 1.22; h0's is 1
    moved = aggregation.delta_norm(_old(), result.params)
    assert moved <= 1.0 + 1e-6  # a convex mix of changes each at most 1
    assert result.figures()["evil"] == {"update_norm": result.norms["evil"], "weight": 10_000.0,
                                        "clipped": 1.0}  # fmt: skip


def test_fedavg_without_bounds_is_refused_by_the_new_model_check() -> None:
    """The last line: with every bound off, the averaged 1e30 model is not taken."""
    poisoned = {k: np.full_like(v, 1e30) for k, v in _old().items()}
    updates = {"h": (HONEST[0], 24), "evil": (poisoned, 10**9)}
    result = aggregate(_old(), updates, AggregationConfig(max_update_norm=math.inf))
    assert "norm grew" in result.refused
    for key, value in _old().items():
        np.testing.assert_array_equal(result.params[key], value)  # the last good model


def test_check_global_names_nan_and_explosion() -> None:
    old = {P: _f32([[3.0, 4.0]])}  # norm 5
    assert check_global(old, {P: _f32([[30.0, 40.0]])}, 10.0) == ""  # norm 50: exactly 10x
    assert "norm grew from 5 to 50.01" in check_global(old, {P: _f32([[30.0, 40.01]])}, 10.0)
    assert check_global(old, {P: _f32([[np.nan, 0.0]])}, 10.0) == f"{P} is not finite"
    tiny = {P: _f32([[0.0, 0.0]])}  # growth is measured from at least 1
    assert check_global(tiny, {P: _f32([[6.0, 8.0]])}, 10.0) == ""


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rule", "mean", "aggregation must be one of"),
        ("trim_fraction", 0.5, r"trim_fraction must be in \[0, 0.5\)"),
        ("trim_fraction", -0.1, "trim_fraction"),
        ("clip_norm", 0.0, "clip_norm must be finite and > 0"),
        ("clip_norm", math.inf, "clip_norm"),
        ("max_update_norm", 0.0, "max_update_norm must be > 0"),
        ("max_update_norm", math.nan, "max_update_norm"),
        ("max_samples", 0, "max_samples must be >= 1"),
        ("max_samples", 2.5, "max_samples must be an integer"),
        ("max_global_growth", 1.0, "max_global_growth must be finite and > 1"),
        ("server_lr", 0.0, "server_lr"),
    ],
)
def test_bad_settings_are_refused_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregationConfig(**{field: value})  # type: ignore[arg-type]


def test_round_config_checks_its_aggregation_fields() -> None:
    with pytest.raises(ValueError, match="aggregation must be one of"):
        RoundConfig(aggregation="krum")
    with pytest.raises(ValueError, match="max_refusals must be >= 1"):
        RoundConfig(max_refusals=0)
    cfg = RoundConfig(aggregation="trimmed-mean", trim_fraction=0.3, clip_norm=2.0)
    assert cfg.aggregation_config() == AggregationConfig(
        rule="trimmed-mean", trim_fraction=0.3, clip_norm=2.0
    )
    assert "aggregation" not in cfg.settings(0.0).__dataclass_fields__  # not in the TASK


def test_refusals_in_a_row_exclude_and_an_acceptance_forgives() -> None:
    tracker = RefusalTracker(3)
    assert tracker.record(["a", "b"], accepted={"b"}, refused={"a"}) == []
    assert tracker.record(["a", "b"], accepted=set(), refused={"a", "b"}) == []
    assert tracker.record(["a", "b"], accepted={"b"}, refused=set()) == []  # a: late, no strike
    assert tracker.strikes == {"a": 2}
    assert tracker.record(["a"], accepted=set(), refused={"a"}) == ["a"]
    assert tracker.excluded == {"a"}
    assert tracker.record(["a"], accepted=set(), refused={"a"}) == []  # reported once
    tracker.record(["c"], accepted=set(), refused={"c"})
    tracker.record(["c"], accepted={"c"}, refused=set())
    assert "c" not in tracker.strikes
    resumed = RefusalTracker(3, tracker.strikes, tracker.excluded)
    assert resumed.excluded == {"a"} and resumed.strikes == tracker.strikes
    with pytest.raises(ValueError, match="refusal limit must be >= 1"):
        RefusalTracker(0)


def test_strike_counts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RefusalTracker, "MAX_TRACKED", 3)
    tracker = RefusalTracker(10)
    for device in "abcde":
        tracker.record([device], accepted=set(), refused={device})
    assert list(tracker.strikes) == ["c", "d", "e"]  # the oldest went first
