"""Buffered (FedBuff-style) rounds: the staleness arithmetic by hand, the inbox's bookkeeping,
and the coordinator's loop in-process over the fake transport of test_coordinator.py.

What they prove: an update s rounds stale moves the model by (1 + s)^-a of its change from the
model it trained from, on top of the sample weights; with every update fresh a buffered round
is a synchronous one; the inbox refuses what it must by name and keeps only the models still
needed; and the loop aggregates every K updates without waiting for a silent device, hands a
device a new TASK as soon as it answers or its deadline passes, and checkpoints each round.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import pytest

from sfprompt.cloud_server.aggregation import MEDIAN, AggregationConfig, aggregate
from sfprompt.cloud_server.buffer_inbox import ACCEPTED, REFUSED, BufferInbox
from sfprompt.cloud_server.buffered import (
    StaleUpdate,
    aggregate_stale,
    rebase,
    staleness_weight,
)
from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.cloud_server.fedavg import UpdateRejected
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.protocol.errors import REJECTED
from sfprompt.protocol.messages import Error, Task, Update
from tests.cloud_server.test_coordinator import (  # noqa: F401 (federation: a fixture)
    HASH,
    federation,
    initial_params,
    shifted_by,
    silent,
)

Params = dict[str, np.ndarray]


def filled(value: float) -> Params:
    return {k: np.full_like(v, value) for k, v in initial_params().items()}


# ---- the arithmetic ----------------------------------------------------------------------------


def test_staleness_weight_is_the_polynomial_discount() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)  # 1 / sqrt(4)
    assert staleness_weight(2, 1.0) == pytest.approx(1 / 3)
    assert staleness_weight(7, 0.0) == 1.0  # a = 0: no discount
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        staleness_weight(-1, 0.5)
    with pytest.raises(ValueError, match="exponent must be finite and >= 0"):
        staleness_weight(1, -0.5)


def test_a_stale_update_moves_the_model_by_its_discounted_change_from_its_own_base() -> None:
    """Current model 2.0. A fresh update (base 2.0 -> 2.4, 10 samples) and one 2 rounds stale
    (base 0.0 -> 0.9, 30 samples): new = 2 + 0.25 * 0.4 + 0.75 * 0.9 / sqrt(3)."""
    current = filled(2.0)
    updates = {
        "fresh": StaleUpdate(filled(2.4), 10, current, staleness=0),
        "stale": StaleUpdate(filled(0.9), 30, filled(0.0), staleness=2),
    }
    result, weights = aggregate_stale(current, updates, AggregationConfig(), exponent=0.5)
    expected = 2.0 + 0.25 * 0.4 + 0.75 * 0.9 / math.sqrt(3.0)  # 2.4897...
    for value in result.params.values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert weights == {"fresh": 1.0, "stale": pytest.approx(1 / math.sqrt(3.0))}
    assert result.weights == {"fresh": 10, "stale": 30}  # the sample cap still applies
    assert not result.refused


def test_fresh_updates_make_a_buffered_round_a_synchronous_one() -> None:
    current = filled(1.0)
    clients = {"a": (filled(1.5), 4), "b": (filled(0.5), 12)}
    fresh = {k: StaleUpdate(p, n, current, staleness=0) for k, (p, n) in clients.items()}
    buffered, _ = aggregate_stale(current, fresh, AggregationConfig(server_lr=0.5), 0.5)
    synchronous = aggregate(current, clients, AggregationConfig(server_lr=0.5))
    for key, value in synchronous.params.items():
        np.testing.assert_array_equal(buffered.params[key], value)


def test_robust_rules_run_on_the_discounted_changes() -> None:
    """Median of the three rebased updates 1 + {0.3, 8 / 3, -0.6}: 1.3, whatever the outlier."""
    current = filled(1.0)
    updates = {
        "a": StaleUpdate(filled(1.3), 1, current, 0),
        "b": StaleUpdate(filled(8.0), 1, filled(0.0), 8),  # change 8, weight 1/3
        "c": StaleUpdate(filled(0.4), 1, current, 0),
    }
    result, _ = aggregate_stale(current, updates, AggregationConfig(rule=MEDIAN), 0.5)
    for value in result.params.values():
        np.testing.assert_allclose(value, 1.3, rtol=1e-6)


def test_rebase_leaves_its_inputs_alone() -> None:
    current, base, params = filled(1.0), filled(0.0), filled(2.0)
    out = rebase(current, base, params, 0.25)
    np.testing.assert_allclose(out["prompt.tokens"], 1.5)
    assert out["prompt.tokens"].dtype == np.float32
    np.testing.assert_array_equal(current["prompt.tokens"], 1.0)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("aggregation_mode", "async", "aggregation_mode must be one of"),
        ("buffer_size", 0, "buffer_size must be an integer >= 1"),
        ("max_staleness", -1, "max_staleness must be an integer >= 0"),
        ("staleness_exponent", float("nan"), "staleness_exponent must be finite"),
    ],
)
def test_bad_buffered_options_are_refused_by_name(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RoundConfig(**{option: value})


# ---- the inbox --------------------------------------------------------------------------------


def inbox_with_task(device: str = "dev-a", deadline: float = 100.0, **kw: Any) -> BufferInbox:
    inbox = BufferInbox(0, filled(0.0), **{"max_staleness": 2, **kw})
    inbox.start(device, 0, deadline, task_bytes=123)
    return inbox


def test_an_update_is_buffered_once_and_frees_its_device() -> None:
    inbox = inbox_with_task()
    inbox.offer("dev-a", 0, filled(1.0), 5, {"local_samples": 9.0}, now=1.0)
    assert inbox.buffered() == 1 and inbox.in_flight() == set()
    assert inbox.outcomes() == [("dev-a", ACCEPTED)] and inbox.outcomes() == []
    with pytest.raises(UpdateRejected, match=r"\[duplicate\].*sent already"):
        inbox.offer("dev-a", 0, filled(1.0), 5, {}, now=1.5)
    batch = inbox.take()
    assert batch.figures["dev-a"] == {"local_samples": 9.0, "bytes_down_task": 123.0}
    assert list(batch.window.rejected) == [("dev-a", "duplicate")]


def test_updates_without_a_task_of_their_version_are_refused() -> None:
    inbox = inbox_with_task()
    with pytest.raises(UpdateRejected, match=r"\[not_selected\] 'dev-x' has no task"):
        inbox.offer("dev-x", 0, filled(1.0), 5, {}, now=1.0)
    with pytest.raises(UpdateRejected, match=r"\[wrong_round\].*version 0, got 3"):
        inbox.offer("dev-a", 3, filled(1.0), 5, {}, now=1.0)
    assert inbox.in_flight() == {"dev-a"}  # neither ended its task


def test_a_late_update_is_refused_and_its_task_ended() -> None:
    inbox = inbox_with_task(deadline=10.0)
    with pytest.raises(UpdateRejected, match=r"\[late\].*2.000 s late"):
        inbox.offer("dev-a", 0, filled(1.0), 5, {}, now=12.0)
    assert inbox.in_flight() == set() and inbox.buffered() == 0
    assert list(inbox.take().window.missing) == [("dev-a", "no update before its task's deadline")]


def test_expire_ends_tasks_past_their_deadline_and_a_later_update_is_late() -> None:
    inbox = inbox_with_task(deadline=10.0)
    assert inbox.expire(now=9.0) == [] and inbox.expire(now=11.0) == ["dev-a"]
    with pytest.raises(UpdateRejected, match=r"\[late\].*not awaited any more"):
        inbox.offer("dev-a", 0, filled(1.0), 5, {})


def test_a_refused_update_counts_as_a_refusal_and_ends_the_task() -> None:
    inbox = inbox_with_task(max_update_norm=1.0)
    with pytest.raises(UpdateRejected, match=r"\[too_large\]"):
        inbox.offer("dev-a", 0, filled(100.0), 5, {}, now=1.0)
    assert inbox.outcomes() == [("dev-a", REFUSED)] and inbox.in_flight() == set()
    assert list(inbox.take().window.missing) == [("dev-a", "update rejected: too_large")]


def test_a_device_twice_in_one_batch_gets_two_keys_with_their_staleness() -> None:
    inbox = inbox_with_task("dev-a")
    inbox.offer("dev-a", 0, filled(1.0), 1, {}, now=1.0)
    inbox.advance(1, filled(1.0))
    inbox.start("dev-a", 1, 100.0, task_bytes=1)
    inbox.offer("dev-a", 1, filled(2.0), 1, {}, now=2.0)
    batch = inbox.take()
    assert batch.version == 1
    assert {k: u.staleness for k, u in batch.updates.items()} == {"dev-a": 1, "dev-a#2": 0}
    np.testing.assert_array_equal(batch.updates["dev-a"].base["prompt.tokens"], 0.0)


def test_models_are_kept_only_while_needed_and_too_stale_work_is_dropped() -> None:
    """max_staleness 2: the model of version 0 is kept for the task and the update based on it
    (version 1's, needed by nobody, is not); both end once version 3 is out, and the model of
    version 0 goes with them."""
    inbox = inbox_with_task("slow")
    inbox.start("fast", 0, 100.0, task_bytes=1)
    inbox.offer("fast", 0, filled(1.0), 1, {}, now=1.0)
    for version in (1, 2):
        inbox.advance(version, filled(float(version)))
        assert inbox.held_versions() == [0, version]
        assert inbox.in_flight() == {"slow"} and inbox.buffered() == 1
    inbox.advance(3, filled(3.0))
    assert inbox.in_flight() == set() and inbox.buffered() == 0
    assert inbox.held_versions() == [3]
    window = inbox.take().window
    assert ("slow", "its model became more than 2 rounds old") in window.missing
    assert ("fast", "late") in window.rejected
    with pytest.raises(UpdateRejected, match=r"\[late\]"):
        inbox.offer("slow", 0, filled(1.0), 1, {})


# ---- the loop, in-process ----------------------------------------------------------------------


def buffered(federation, **config: Any):  # noqa: F811 (the fixture)
    return federation(aggregation_mode="buffered", **config)


def test_a_stale_update_joins_a_later_round_discounted(federation) -> None:  # noqa: F811
    """dev-a answers its TASKs at once with +1 (not its second of version 2); dev-b keeps its
    TASK of version 0 and answers +3 when dev-a first gets version 2. K = 2: rounds 1 and 2 are
    dev-a's twice (-> 2.0); round 3 is 2 + 0.5 * 1 + 0.5 * 3 / sqrt(1 + 2), dev-b 2 rounds
    stale."""
    fed = buffered(federation, rounds=3, buffer_size=2, min_devices=2, round_timeout_s=30.0)
    transport = fed.transport
    held: list[Task] = []
    answered: list[int] = []
    fast = shifted_by(1.0, samples=10)

    def slow(task: Task) -> None:
        held.append(task)

    def fast_then_release(task: Task) -> Update | None:
        if task.round == 2 and 2 in answered:
            return None  # keeps round 3 to the two updates below
        if task.round == 2:
            transport.send_up(shifted_by(3.0, samples=10)(held.pop()))
        answered.append(task.round)
        return fast(task)

    transport.join("dev-a", fast_then_release)
    transport.join("dev-b", slow)
    assert fed.run() < 10.0
    expected = 2.0 + 0.5 * 1.0 + 0.5 * 3.0 / math.sqrt(3.0)
    for value in fed.coordinator.params.values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    first, second, third = fed.rounds()
    assert first["accepted"] == ["dev-a", "dev-a#2"] == second["accepted"]
    assert third["accepted"] == ["dev-a", "dev-b"]
    assert third["devices"]["dev-b"]["staleness"] == 2.0
    assert third["devices"]["dev-b"]["staleness_weight"] == pytest.approx(3**-0.5)
    assert third["devices"]["dev-a"]["staleness"] == 0.0
    assert third["devices"]["dev-b"]["bytes_down_task"] > 0
    assert transport.tasks_by_round()[0] == ["dev-a", "dev-b", "dev-a"]  # b: one task only


def test_rounds_do_not_wait_for_a_silent_device(federation) -> None:  # noqa: F811
    """With K = 1 the fast device makes every round; the silent one, whose TASK has a 30 s
    deadline, holds none of them (a synchronous round would wait 30 s). Answering at once,
    dev-a gets a second TASK of a version before its round closes: from round 2 on a round
    takes both (every update buffered is taken), each fresh."""
    fed = buffered(federation, rounds=3, buffer_size=1, min_devices=2, round_timeout_s=30.0)
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    fed.transport.join("dev-b", silent)
    assert fed.run() < 10.0
    rounds = fed.rounds()
    assert [r["accepted"] for r in rounds] == [["dev-a"]] + [["dev-a", "dev-a#2"]] * 2
    assert all(d["staleness"] == 0.0 for r in rounds for d in r["devices"].values())
    for value in fed.coordinator.params.values():
        np.testing.assert_allclose(value, 3.0, rtol=1e-6)
    sent_to_b = [t.round for _, t in fed.transport.sent(Task) if t.device_id == "dev-b"]
    assert sent_to_b == [0]  # still in flight: not sent another


def test_a_device_past_its_deadline_gets_a_new_task(federation) -> None:  # noqa: F811
    fed = buffered(federation, rounds=2, buffer_size=5, round_timeout_s=0.3)
    fed.transport.join("dev-b", silent)
    fed.run()
    sent = [t.round for _, t in fed.transport.sent(Task) if t.device_id == "dev-b"]
    assert sent[:2] == [0, 1]
    missing = [m for r in fed.rounds() for m in r["missing"]]
    assert ["dev-b", "no update before its task's deadline"] in missing
    assert all(r["accepted"] == [] for r in fed.rounds())


def test_a_device_refused_too_often_gets_no_more_tasks(federation) -> None:  # noqa: F811
    fed = buffered(federation, rounds=2, buffer_size=1, max_refusals=1, max_update_norm=10.0)
    fed.transport.join("honest", shifted_by(1.0, samples=5))
    fed.transport.join("loud", shifted_by(1e6, samples=5))
    fed.run()
    assert [t.round for _, t in fed.transport.sent(Task) if t.device_id == "loud"] == [0]
    errors = [m for _, m in fed.transport.sent(Error) if m.device_id == "loud"]
    assert errors and errors[0].code == REJECTED and "too_large" in errors[0].text
    assert fed.rounds()[-1]["excluded"] == ["loud"]
    for value in fed.coordinator.params.values():
        np.testing.assert_allclose(value, 2.0, rtol=1e-6)


def test_buffered_rounds_are_checkpointed_and_resume_at_their_version(
    federation,  # noqa: F811
    tmp_path,
) -> None:
    fed = buffered(federation, rounds=2, buffer_size=1)
    fed.transport.join("dev-a", shifted_by(0.5, samples=4))
    fed.run()
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors", HASH)
    assert ckpt is not None and ckpt.round == 2
    again = buffered(federation, rounds=3, buffer_size=1)
    again.transport.join("dev-a", shifted_by(0.5, samples=4))
    assert again.coordinator.resume() is True
    again.run()
    assert [t.round for _, t in again.transport.sent(Task)] == [2]
    for value in again.coordinator.params.values():
        np.testing.assert_allclose(value, 1.5, rtol=1e-6)


def test_a_device_gone_offline_is_not_waited_for(federation) -> None:  # noqa: F811
    """dev-b drops offline 0.05 s into its task (grace 0.05 s); dev-a makes the round's three
    updates in >= 0.9 s: the round records dev-b as gone, and dev-b gets no other task."""
    fed = buffered(federation, rounds=1, buffer_size=3, min_devices=2, offline_grace_s=0.05)
    transport = fed.transport
    steady = shifted_by(1.0, samples=1)

    def slow_answer(task: Task) -> Update:
        time.sleep(0.3)
        return steady(task)

    def vanish(task: Task) -> None:
        threading.Timer(0.05, transport.presence, ("dev-b", False)).start()

    transport.join("dev-a", slow_answer)
    transport.join("dev-b", vanish)
    fed.run()
    (record,) = fed.rounds()
    assert record["accepted"] == ["dev-a", "dev-a#2", "dev-a#3"]
    assert record["missing"] == [["dev-b", "went offline"]]
    assert [t.round for _, t in transport.sent(Task) if t.device_id == "dev-b"] == [0]
