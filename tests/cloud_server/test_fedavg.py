"""FedAvg matches a hand computation and never writes its inputs; every kind of bad update is
refused with its reason; the round inbox waits exactly as long as it should, also under threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sfprompt.cloud_server.fedavg import (
    DUPLICATE,
    LATE,
    NO_SAMPLES,
    NON_FINITE,
    NOT_SELECTED,
    REASONS,
    WRONG_DTYPE,
    WRONG_KEYS,
    WRONG_ROUND,
    WRONG_SHAPE,
    Params,
    RoundInbox,
    UpdateRejected,
    check_update,
    fedavg,
)

PROMPT = "prompt.tokens"
BIAS = "tail.head.bias"


def _f32(values: list) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _old() -> Params:
    return {PROMPT: _f32([[0.0, 2.0]]), BIAS: _f32([1.0, -1.0])}


# Client A holds 1 sample, client B 3: weights 1/4 and 3/4.
# Deltas from old:  A: prompt [[4, 0]], bias [0, 4];   B: prompt [[0, 4]], bias [4, 0].
# Weighted delta:   prompt [[1, 3]], bias [3, 1].
def _clients() -> list[tuple[Params, int]]:
    a = {PROMPT: _f32([[4.0, 2.0]]), BIAS: _f32([1.0, 3.0])}
    b = {PROMPT: _f32([[0.0, 6.0]]), BIAS: _f32([5.0, -1.0])}
    return [(a, 1), (b, 3)]


@pytest.mark.parametrize(
    ("server_lr", "prompt", "bias"),
    [
        (1.0, [[1.0, 5.0]], [4.0, 0.0]),  # old + delta: the plain weighted mean
        (0.5, [[0.5, 3.5]], [2.5, -0.5]),  # old + delta / 2
    ],
)
def test_fedavg_equals_hand_computation(server_lr: float, prompt: list, bias: list) -> None:
    new = fedavg(_old(), _clients(), server_lr=server_lr)
    assert set(new) == {PROMPT, BIAS}
    assert new[PROMPT].dtype == np.float32 and new[BIAS].dtype == np.float32
    np.testing.assert_array_equal(new[PROMPT], _f32(prompt))
    np.testing.assert_array_equal(new[BIAS], _f32(bias))


def test_fedavg_with_unit_lr_is_the_sample_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    old = {PROMPT: rng.standard_normal((10, 16)).astype(np.float32)}
    updates = [({PROMPT: rng.standard_normal((10, 16)).astype(np.float32)}, n) for n in (5, 1, 120)]
    new = fedavg(old, updates)
    stacked = np.stack([u[PROMPT].astype(np.float64) for u, _ in updates])
    expected = np.average(stacked, axis=0, weights=[5, 1, 120])
    np.testing.assert_allclose(new[PROMPT], expected, rtol=1e-6, atol=1e-6)
    # A single client at server_lr 1 gives back exactly that client.
    (only, n), *_ = updates
    np.testing.assert_array_equal(fedavg(old, [(only, n)])[PROMPT], only[PROMPT])


def test_fedavg_does_not_touch_its_inputs() -> None:
    old, clients = _old(), _clients()
    copies = [{k: v.copy() for k, v in p.items()} for p in [old, *(c for c, _ in clients)]]
    for params in [old, *(c for c, _ in clients)]:
        for value in params.values():
            value.flags.writeable = False  # an in-place write would raise
    new = fedavg(old, clients, server_lr=0.5)
    for params, copy in zip([old, *(c for c, _ in clients)], copies):
        for key in copy:
            np.testing.assert_array_equal(params[key], copy[key])
    for key, value in new.items():
        assert value.flags.writeable
        for params in [old, *(c for c, _ in clients)]:
            assert not np.shares_memory(value, params[key])


def test_fedavg_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        fedavg(_old(), [])
    (a, _), _ = _clients()
    with pytest.raises(ValueError, match="server_lr"):
        fedavg(_old(), [(a, 1)], server_lr=float("nan"))
    with pytest.raises(ValueError, match="server_lr"):
        fedavg(_old(), [(a, 1)], server_lr=0.0)
    wrong_shape = {**a, BIAS: _f32([1.0, 2.0, 3.0])}
    with pytest.raises(UpdateRejected, match=r"update 1: tail.head.bias: expected shape \(2,\)"):
        fedavg(_old(), [(a, 1), (wrong_shape, 2)])
    with pytest.raises(ValueError, match="missing keys"):
        fedavg(_old(), [({PROMPT: a[PROMPT]}, 1)])
    old64 = {k: v.astype(np.float64) for k, v in _old().items()}
    with pytest.raises(ValueError, match="global parameter .*float32"):
        fedavg(old64, [(a, 1)])


def _bad_updates() -> list[tuple[str, Params, object, str]]:
    (good, _), _ = _clients()
    nan = good[BIAS].copy()
    nan[1] = np.nan
    inf = good[PROMPT].copy()
    inf[0, 0] = -np.inf
    return [
        (WRONG_KEYS, {PROMPT: good[PROMPT]}, 1, r"missing keys \['tail.head.bias'\]"),
        (WRONG_KEYS, {**good, "tail.extra": good[BIAS]}, 1, r"unexpected keys \['tail.extra'\]"),
        (WRONG_SHAPE, {**good, PROMPT: good[PROMPT].T.copy()}, 1, r"\(1, 2\), got \(2, 1\)"),
        (WRONG_DTYPE, {**good, BIAS: good[BIAS].astype(np.float64)}, 1, "float32, got float64"),
        (WRONG_DTYPE, {**good, BIAS: [1.0, 3.0]}, 1, "numpy array, got list"),  # type: ignore[dict-item]
        (NON_FINITE, {**good, BIAS: nan}, 1, "tail.head.bias: 1 of 2 values"),
        (NON_FINITE, {**good, PROMPT: inf}, 1, "prompt.tokens: 1 of 2 values"),
        (NO_SAMPLES, good, 0, "got 0"),
        (NO_SAMPLES, good, -3, "got -3"),
        (NO_SAMPLES, good, 2.5, "got 2.5"),
        (NO_SAMPLES, good, True, "got True"),
    ]


@pytest.mark.parametrize(("reason", "params", "samples", "message"), _bad_updates())
def test_check_update_names_the_problem(
    reason: str, params: Params, samples: int, message: str
) -> None:
    with pytest.raises(UpdateRejected, match=message) as caught:
        check_update(_old(), params, samples)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ValueError)


def test_check_update_accepts_a_good_update() -> None:
    (good, _), _ = _clients()
    check_update(_old(), good, 1)  # raises nothing
    check_update(_old(), good, np.int64(7))  # numpy integers count too


def test_unknown_reason_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown rejection reason"):
        UpdateRejected("bad_vibes", "x")
    assert len(REASONS) == 10


def _inbox(selected: set[str], seconds: float = 10.0) -> RoundInbox:
    return RoundInbox(3, selected, _old(), deadline=time.monotonic() + seconds)


def _good() -> Params:
    return _clients()[0][0]


def test_inbox_refuses_with_each_reason_and_logs_it() -> None:
    inbox = _inbox({"a", "b", "c"})
    cases = [
        (WRONG_ROUND, lambda: inbox.offer("a", 2, _good(), 5)),
        (NOT_SELECTED, lambda: inbox.offer("z", 3, _good(), 5)),
        (NON_FINITE, lambda: inbox.offer("b", 3, {**_good(), BIAS: _f32([np.nan, 0])}, 5)),
        (DUPLICATE, lambda: inbox.offer("b", 3, _good(), 5)),  # b's first report was final
        (LATE, lambda: inbox.offer("c", 3, _good(), 5, now=inbox.deadline + 0.5)),
    ]
    for reason, offer in cases:
        with pytest.raises(UpdateRejected) as caught:
            offer()
        assert caught.value.reason == reason
    inbox.offer("a", 3, _good(), 5)  # a wrong-round offer did not use up a's report
    with pytest.raises(UpdateRejected, match="'a' already reported") as caught:
        inbox.offer("a", 3, _good(), 5)
    assert caught.value.reason == DUPLICATE
    assert list(inbox.accepted) == ["a"] and inbox.accepted["a"][1] == 5
    assert inbox.rejected == [
        ("a", WRONG_ROUND),
        ("z", NOT_SELECTED),
        ("b", NON_FINITE),
        ("b", DUPLICATE),
        ("c", LATE),
        ("a", DUPLICATE),
    ]
    assert inbox.pending == {"c"}  # the late offer did not count: c may still be dropped
    inbox.close()
    with pytest.raises(UpdateRejected, match="inbox closed") as caught:
        inbox.offer("c", 3, _good(), 5)
    assert caught.value.reason == LATE


def _offer_later(inbox: RoundInbox, device: str, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        inbox.offer(device, inbox.round, _good(), 2)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_inbox_wait_returns_as_soon_as_all_reported() -> None:
    inbox = _inbox({"a", "b"}, seconds=30.0)
    threads = [_offer_later(inbox, "a", 0.05), _offer_later(inbox, "b", 0.15)]
    start = time.monotonic()
    assert inbox.wait() is True
    assert 0.1 < time.monotonic() - start < 5.0  # waited for b, not for the deadline
    for thread in threads:
        thread.join()
    assert set(inbox.accepted) == {"a", "b"} and inbox.pending == set()


def test_inbox_wait_gives_up_at_the_deadline() -> None:
    inbox = _inbox({"a", "b"}, seconds=0.4)
    _offer_later(inbox, "a", 0.0).join()
    start = time.monotonic()
    assert inbox.wait() is False
    assert 0.3 < time.monotonic() - start < 3.0
    assert set(inbox.accepted) == {"a"} and inbox.pending == {"b"}
    assert inbox.wait(timeout=10.0) is False  # past the deadline: returns at once
    assert time.monotonic() - start < 3.0


def test_inbox_wait_timeout_shorter_than_deadline() -> None:
    inbox = _inbox({"a"}, seconds=30.0)
    start = time.monotonic()
    assert inbox.wait(timeout=0.2) is False
    assert 0.15 < time.monotonic() - start < 3.0


def test_inbox_drop_ends_the_wait_and_keeps_accepted_updates() -> None:
    inbox = _inbox({"a", "b", "c"}, seconds=30.0)
    inbox.offer("a", 3, _good(), 1)
    inbox.drop("a")  # went offline after reporting: its update stays
    dropper = threading.Timer(0.1, inbox.drop, args=("b",))
    dropper.start()
    _offer_later(inbox, "c", 0.05)
    start = time.monotonic()
    assert inbox.wait() is True
    assert 0.05 < time.monotonic() - start < 5.0
    dropper.join()
    assert set(inbox.accepted) == {"a", "c"}
    assert inbox.pending == set()
    assert inbox.missing() == [("b", "went offline")]


def test_inbox_drop_says_why_a_device_gave_the_round_up() -> None:
    inbox = _inbox({"a", "b"}, seconds=30.0)
    inbox.drop("b", "failed on the device: [bad_field] defense below its floor")
    inbox.drop("b", "went offline")  # the first reason stays
    inbox.offer("a", 3, _good(), 1)
    assert inbox.wait() is True
    assert inbox.missing() == [("b", "failed on the device: [bad_field] defense below its floor")]


def test_inbox_refused_content_counts_as_reported() -> None:
    inbox = _inbox({"a"}, seconds=30.0)
    with pytest.raises(UpdateRejected):
        inbox.offer("a", 3, _good(), 0)
    start = time.monotonic()
    assert inbox.wait() is True  # nothing more to wait for, although nothing was accepted
    assert time.monotonic() - start < 1.0
    assert inbox.accepted == {} and inbox.rejected == [("a", NO_SAMPLES)]


def test_inbox_concurrent_offers_accept_exactly_one_per_device() -> None:
    devices = {f"dev-{i}" for i in range(16)}
    inbox = _inbox(devices, seconds=30.0)
    barrier = threading.Barrier(2 * len(devices))
    outcomes: list[str] = []
    lock = threading.Lock()

    def offer(device: str) -> None:
        barrier.wait()
        try:
            inbox.offer(device, 3, _good(), 1)
            result = "accepted"
        except UpdateRejected as error:
            result = error.reason
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=offer, args=(d,)) for d in sorted(devices) * 2]
    for thread in threads:
        thread.start()
    assert inbox.wait(timeout=10.0) is True
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["accepted"] * 16 + [DUPLICATE] * 16
    assert set(inbox.accepted) == devices


def test_inbox_refuses_an_empty_selection() -> None:
    with pytest.raises(ValueError, match="no devices selected"):
        RoundInbox(1, set(), _old(), deadline=time.monotonic() + 1)
