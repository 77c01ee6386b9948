"""Floods of chunk sets cannot exhaust the receiver: every set is counted with what it retains,
each device has its own share of the budget and a bounded number of open sets, a set expires a
fixed time after its first chunk whatever duplicates come, and one device's flood neither blocks
nor slows another device's chunked message (bench/bench_floods.py prints the figures)."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from bench.bench_floods import dangling, legit_chunks, padded_packet
from sfprompt.protocol.chunking import Reassembler
from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import BUSY, TOO_LARGE, ProtocolError
from sfprompt.protocol.messages import BodyOut, Chunk, Error, Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from sfprompt.protocol.wire import Limits
from tests.helpers import wait_for

T = Topics()
MakeClient = Callable[..., MqttClient]


def add_all(reassembler: Reassembler, chunks: list[Chunk]) -> bytearray | None:
    done = [out for c in chunks if (out := reassembler.add(c)) is not None]
    return done[0] if done else None


def test_one_device_holds_a_bounded_number_of_sets_and_others_still_reassemble() -> None:
    reassembler = Reassembler()
    refused = 0
    for number in range(5_000):
        try:
            reassembler.add(dangling("mallory", number))
        except ProtocolError as exc:
            assert exc.code == BUSY and "mallory" in str(exc)
            refused += 1
    assert reassembler.pending <= 64 and refused == 5_000 - reassembler.pending
    payload, chunks = legit_chunks(40_000, chunk_bytes=9_000)
    assert bytes(add_all(reassembler, chunks) or b"") == payload


def test_the_budget_bounds_what_sets_really_retain() -> None:
    """Dangling sets of 5,000 devices (no broker ACL): the running total counts what each set
    holds (not only its buffer), so a 1 MiB budget bounds the memory they keep to 1 MiB."""
    reassembler = Reassembler(max_buffered_bytes=1 << 20)
    refused = 0
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(5_000):
            try:
                reassembler.add(dangling(f"dev-{number}", number))
            except ProtocolError as exc:
                assert exc.code == BUSY
                refused += 1
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert retained <= 1 << 20, f"{retained >> 10} KiB retained by {reassembler.pending} sets"
    assert retained <= reassembler.buffered_bytes <= 1 << 20 and refused > 0
    payload, chunks = legit_chunks(40_000, chunk_bytes=9_000)
    with pytest.raises(ProtocolError, match="busy"):  # the budget is full, for everyone
        add_all(reassembler, chunks)


def test_two_huge_claims_from_one_device_do_not_block_another() -> None:
    limits = Limits(max_payload_bytes=4 << 20)
    reassembler = Reassembler(limits)
    reassembler.add(dangling("mallory", 1, total_bytes=4 << 20))
    with pytest.raises(ProtocolError) as refused:
        reassembler.add(dangling("mallory", 2, total_bytes=4 << 20))
    assert refused.value.code == BUSY and "mallory" in str(refused.value)
    payload, chunks = legit_chunks(1 << 20, chunk_bytes=9_000)
    assert bytes(add_all(reassembler, chunks) or b"") == payload


def test_a_claim_over_a_devices_share_is_too_large() -> None:
    limits = Limits(max_payload_bytes=4 << 20, max_device_reassembly_bytes=1 << 20)
    with pytest.raises(ProtocolError) as refused:
        Reassembler(limits).add(dangling("mallory", 1, total_bytes=2 << 20))
    assert refused.value.code == TOO_LARGE


def test_duplicates_do_not_extend_expiry() -> None:
    now = [0.0]
    reassembler = Reassembler(ttl_s=10, clock=lambda: now[0])
    first = dangling("mallory", 1, total_bytes=4)
    reassembler.add(first)
    for t in (3.0, 6.0, 9.0):  # the same chunk again and again, as a replaying peer would
        now[0] = t
        assert reassembler.add(first) is None
    now[0] = 10.5
    assert reassembler.expire() == [("mallory", "m1")]
    assert reassembler.pending == 0 and reassembler.buffered_bytes == 0


def test_a_set_is_due_a_fixed_time_after_its_first_chunk() -> None:
    now = [0.0]
    _, chunks = legit_chunks(40_000, chunk_bytes=9_000)
    reassembler = Reassembler(ttl_s=10, clock=lambda: now[0])
    reassembler.add(chunks[0])
    now[0] = 9.0
    reassembler.add(chunks[1])  # progress does not extend it either
    now[0] = 10.5
    assert reassembler.expire() == [("cam-01", chunks[0].msg_id)]
    # expired sets go oldest first, and a set started later is not touched
    now[0] = 11.0
    reassembler.add(chunks[0])
    assert reassembler.expire() == [] and reassembler.pending == 1


def test_padded_chunk_headers_are_counted_not_retained() -> None:
    """50 sets whose first chunk has a 1 MiB header: the set keeps its layout, not the packet."""
    reassembler = Reassembler()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(50):
            packet = padded_packet(dangling(f"dev-{number}", number, total_bytes=16), (1 << 20) - 8)
            reassembler.add(decode(packet))  # type: ignore[arg-type]
            del packet
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert reassembler.pending == 50
    assert retained < 1 << 20, f"{retained >> 10} KiB retained by 50 sets of 16 bytes"
    assert retained <= reassembler.buffered_bytes + 4096  # (a few interpreter allocations)


# ---- over a real broker ---------------------------------------------------------------------


def _body_out_server(make_client: MakeClient) -> MqttClient:
    """Answers SMASHED with BODY_OUT inline, on paho's network thread, as the body service does."""

    def answer(inbound) -> Message | None:  # noqa: ANN001
        m = inbound.message
        assert isinstance(m, Smashed)
        env = {"device_id": m.device_id, "round": m.round, "step": m.step}
        return BodyOut(z=np.ascontiguousarray(m.h[:, :1]), **env)

    server = make_client("server")
    server.subscribe(T.all_up_of("smashed"), answer, inline=True)
    return server


@pytest.mark.slow
def test_a_flood_of_dangling_sets_over_mqtt(make_client: MakeClient) -> None:
    """2,000 dangling chunk sets from one device: the server holds a bounded few, tells the
    flooder `busy`, and answers another device's chunked SMASHED."""
    server = _body_out_server(make_client)
    errors: list[Message] = []
    mallory = make_client("mallory")
    mallory.subscribe(T.device_inbox("mallory"), lambda inbound: errors.append(inbound.message))
    topic = T.up("mallory", "smashed")
    for number in range(2_000):
        mallory.publish_packets(topic, [encode(dangling("mallory", number))], timeout=None)
    mallory.publish_packets(topic, [encode(dangling("mallory", 2_000))], timeout=60)

    device = make_client("cam-01", max_chunk_bytes=4096)
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    h = np.random.default_rng(1).standard_normal((2, 50, 64)).astype(np.float32)
    smashed = Smashed(device_id="cam-01", round=1, step=1, h=h)
    assert len(device.packets(smashed)) > 1
    reply = device.request(T.up("cam-01", "smashed"), smashed, T.down("cam-01", "body_out"), 30)
    assert isinstance(reply, BodyOut) and np.array_equal(reply.z, h[:, :1])
    assert server._reassembler.pending <= 64  # answered after the whole flood: same connection
    wait_for(lambda: len(errors) >= 2_001 - server._reassembler.pending, 30, "the refusals")
    assert {e.code for e in errors if isinstance(e, Error)} == {BUSY}


def test_a_chunk_naming_another_device_is_refused(make_client: MakeClient) -> None:
    """Sets are kept per device, so a chunk must come from the device its envelope names."""
    _body_out_server(make_client)
    errors: list[Message] = []
    mallory = make_client("mallory")
    mallory.subscribe(T.device_inbox("mallory"), lambda inbound: errors.append(inbound.message))
    chunk = dangling("cam-01", 1)
    mallory.publish_packets(T.up("mallory", "smashed"), [encode(chunk)], timeout=None)
    wait_for(lambda: len(errors) == 1, 30, "the refusal")
    assert isinstance(errors[0], Error) and errors[0].code == "bad_field"
    assert "device_id" in errors[0].text
