"""The dedup memories keep what their docstrings promise: SeenIds the last `capacity` keys,
ReplyCache the newest replies within a byte budget, oldest out first, safe across threads."""

from __future__ import annotations

import threading

from sfprompt.protocol.dedup import CachedReply, ReplyCache, SeenIds


def reply(size: int, topic: str = "down/dev/body_out") -> CachedReply:
    """A reply of `size` bytes in two packets (the budget counts every packet)."""
    half = size // 2
    return CachedReply(topic, [b"a" * half, b"b" * (size - half)], correlation=b"c")


# ---- SeenIds ---------------------------------------------------------------------------------


def test_a_key_is_new_once_then_a_duplicate() -> None:
    seen = SeenIds(capacity=3)
    assert seen.add(("dev", "m1")) is True
    assert ("dev", "m1") in seen
    assert seen.add(("dev", "m1")) is False
    assert ("other", "m1") not in seen  # the sender is part of the key


def test_seen_ids_forget_the_oldest_beyond_capacity() -> None:
    seen = SeenIds(capacity=2)
    for msg_id in ("m1", "m2", "m3"):
        seen.add(("dev", msg_id))
    assert ("dev", "m1") not in seen
    assert ("dev", "m2") in seen and ("dev", "m3") in seen
    assert seen.add(("dev", "m1")) is True  # forgotten: new again


def test_a_duplicate_does_not_refresh_a_key() -> None:
    """Order is first arrival: seeing a key again does not keep it longer."""
    seen = SeenIds(capacity=2)
    seen.add(("dev", "m1"))
    seen.add(("dev", "m2"))
    seen.add(("dev", "m1"))  # duplicate
    seen.add(("dev", "m3"))
    assert ("dev", "m1") not in seen and ("dev", "m2") in seen


# ---- ReplyCache ------------------------------------------------------------------------------


def test_a_miss_is_none_and_a_hit_is_the_same_reply() -> None:
    cache = ReplyCache(max_bytes=100)
    assert cache.get(("dev", "m1")) is None
    filed = reply(10)
    cache.put(("dev", "m1"), filed)
    assert cache.get(("dev", "m1")) is filed
    assert cache.get(("other", "m1")) is None


def test_oldest_replies_go_first_when_over_the_byte_budget() -> None:
    cache = ReplyCache(max_bytes=30)
    for msg_id in ("m1", "m2", "m3"):
        cache.put(("dev", msg_id), reply(10))  # exactly at the budget: all stay
    assert all(cache.get(("dev", m)) is not None for m in ("m1", "m2", "m3"))
    cache.put(("dev", "m4"), reply(15))  # 45 bytes: m1 and m2 must go (30 - 20 + 15 = 25)
    assert cache.get(("dev", "m1")) is None and cache.get(("dev", "m2")) is None
    assert cache.get(("dev", "m3")) is not None and cache.get(("dev", "m4")) is not None


def test_the_newest_reply_stays_even_over_the_budget() -> None:
    cache = ReplyCache(max_bytes=10)
    cache.put(("dev", "m1"), reply(5))
    big = reply(50)
    cache.put(("dev", "m2"), big)
    assert cache.get(("dev", "m2")) is big
    assert cache.get(("dev", "m1")) is None  # older ones made room, to no avail


def test_filing_a_key_again_replaces_its_reply_and_its_bytes() -> None:
    """A replaced reply's bytes are no longer counted, and the key becomes the newest."""
    cache = ReplyCache(max_bytes=30)
    cache.put(("dev", "m1"), reply(20))
    cache.put(("dev", "m2"), reply(10))
    newer = reply(5)
    cache.put(("dev", "m1"), newer)  # 15 bytes now, not 35: nothing evicted
    assert cache.get(("dev", "m1")) is newer and cache.get(("dev", "m2")) is not None
    cache.put(("dev", "m3"), reply(20))  # 35: the oldest is now m2
    assert cache.get(("dev", "m2")) is None
    assert cache.get(("dev", "m1")) is newer and cache.get(("dev", "m3")) is not None


def test_a_hit_does_not_make_a_reply_newer() -> None:
    """Eviction is by filing order: a repeated request does not keep its reply longer."""
    cache = ReplyCache(max_bytes=20)
    cache.put(("dev", "m1"), reply(10))
    cache.put(("dev", "m2"), reply(10))
    assert cache.get(("dev", "m1")) is not None
    cache.put(("dev", "m3"), reply(10))
    assert cache.get(("dev", "m1")) is None and cache.get(("dev", "m2")) is not None


def test_replies_filed_from_many_threads_stay_within_the_budget() -> None:
    """Concurrent puts (the batcher files replies from its worker) keep the byte count true:
    afterwards the cache holds exactly the newest replies that fit."""
    cache = ReplyCache(max_bytes=1_000)
    threads = [
        threading.Thread(
            target=lambda t=t: [cache.put((f"dev{t}", f"m{i}"), reply(10)) for i in range(500)]
        )
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = [(t, i) for t in range(8) for i in range(500) if cache.get((f"dev{t}", f"m{i}"))]
    assert len(kept) == 100  # 1,000 bytes of 10-byte replies: the count matches the content
    for t in range(8):  # within each thread's own order, only its newest survive
        mine = sorted(i for d, i in kept if d == t)
        assert mine == list(range(500 - len(mine), 500))
