"""The elastic pool's assignment, by hand on small cases: balanced by capacity, sticky, only the
devices of a gone worker (or past the rebalance threshold) move."""

from __future__ import annotations

import pytest

from sfprompt.cloud_server.worker_pool import assign_devices
from sfprompt.protocol.pool_messages import MAX_WORKER_DEVICES

DEVICES = ["a", "b", "c", "d"]


def by_worker(assignment: dict[str, str]) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    for device, worker in sorted(assignment.items()):
        lists.setdefault(worker, []).append(device)
    return lists


def test_fresh_devices_are_split_evenly_between_equal_workers() -> None:
    assert by_worker(assign_devices(DEVICES, {"w1": 1, "w2": 1}, {})) == {
        "w1": ["a", "c"],
        "w2": ["b", "d"],
    }


def test_capacity_weighs_the_shares() -> None:
    lists = by_worker(assign_devices(DEVICES, {"small": 1, "big": 3}, {}))
    assert {w: len(d) for w, d in lists.items()} == {"small": 1, "big": 3}


def test_a_device_keeps_its_worker_while_that_worker_lives() -> None:
    previous = {"a": "w2", "b": "w2", "c": "w1", "d": "w1"}
    assert assign_devices(DEVICES, {"w1": 1, "w2": 1}, previous) == previous


def test_only_the_devices_of_a_gone_worker_move() -> None:
    previous = {"a": "w1", "b": "w2", "c": "w3", "d": "w1"}
    moved = assign_devices(DEVICES, {"w1": 1, "w2": 1}, previous)
    assert moved["a"] == moved["d"] == "w1" and moved["b"] == "w2"
    assert moved["c"] == "w2"  # the one below its share


def test_a_joining_worker_takes_devices_only_past_the_threshold() -> None:
    all_on_w1 = {d: "w1" for d in DEVICES}
    # 4 on w1 against a share of 2: past 2 * 1.25, so w1 keeps 2 and w2 takes 2
    joined = by_worker(assign_devices(DEVICES, {"w1": 1, "w2": 1}, all_on_w1))
    assert joined == {"w1": ["a", "b"], "w2": ["c", "d"]}
    # 3 on w1 against a share of 1.5: past 1.5 * 1.25, so w1 keeps ceil(1.5) = 2, one moves
    three = {d: "w1" for d in "abc"}
    assert len(by_worker(assign_devices("abc", {"w1": 1, "w2": 1}, three))["w2"]) == 1
    # a looser threshold keeps all 3 (3 <= 1.5 * 2); a balanced pool never moves anything
    assert set(assign_devices("abc", {"w1": 1, "w2": 1}, three, rebalance=1.0).values()) == {"w1"}
    balanced = {"a": "w1", "b": "w1", "c": "w2"}
    assert assign_devices("abc", {"w1": 1, "w2": 1}, balanced) == balanced


def test_new_devices_fill_the_least_loaded_worker_first() -> None:
    previous = {"a": "w1", "b": "w1"}
    got = assign_devices(DEVICES, {"w1": 1, "w2": 1}, previous)
    assert got == {"a": "w1", "b": "w1", "c": "w2", "d": "w2"}


def test_without_workers_or_with_too_many_devices_it_says_so() -> None:
    with pytest.raises(ValueError, match="no live body worker"):
        assign_devices(DEVICES, {}, {})
    many = [f"d{i}" for i in range(MAX_WORKER_DEVICES + 1)]
    with pytest.raises(ValueError, match="start more workers"):
        assign_devices(many, {"w1": 1}, {})
    assert len(assign_devices(many, {"w1": 1, "w2": 1}, {})) == len(many)


def test_a_pool_member_leaves_a_will_and_no_session_behind() -> None:
    """A dead worker's broker session would queue its old devices' h for nobody: none is kept,
    and its Last Will says it went offline."""
    from sfprompt.cloud_server.pool_member import member_session
    from sfprompt.protocol.client_config import ClientConfig
    from sfprompt.protocol.codec import decode
    from sfprompt.protocol.pool_messages import WorkerPresence

    base = ClientConfig("sfprompt-worker-gpu0")
    assert base.session_expiry_s > 0  # devices and the server keep theirs
    member = member_session(base, "gpu0")
    assert member.session_expiry_s == 0 and member.client_id == base.client_id
    assert member.will is not None
    topic, payload = member.will
    gone = decode(payload)
    assert topic == base.topics.worker_presence("gpu0")
    assert isinstance(gone, WorkerPresence) and gone.device_id == "gpu0" and not gone.online
