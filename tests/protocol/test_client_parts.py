"""The client's parts without a broker: routing picks the first registered matching subscription,
PUBACKs are matched to their waiters whatever the order of arrival and never pile up, a decode
handed the header it peeked equals a fresh one, and the packet limit follows the broker's."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
from paho.mqtt.matcher import MQTTMatcher
from protocol_fixtures import assert_same, sample_messages

from sfprompt.protocol.acks import PubAcks, SubAcks
from sfprompt.protocol.bundle import BATCH, TensorSpec
from sfprompt.protocol.chunking import PACKET_OVERHEAD, packets_for, payload_limit
from sfprompt.protocol.codec import decode, encode, peek
from sfprompt.protocol.messages import Chunk, Smashed
from sfprompt.protocol.subscriptions import Subscription, Subscriptions

OK = SimpleNamespace(is_failure=False, value=0)


def _subscription(topic_filter: str) -> Subscription:
    return Subscription(topic_filter, lambda inbound: None, inline=False)  # its own handler


def test_a_topic_goes_to_the_first_registered_matching_subscription() -> None:
    subs = Subscriptions(MQTTMatcher())
    specific = _subscription("sfp/v1/dev/+/up/smashed")
    broad = _subscription("sfp/v1/dev/+/up/#")
    again = _subscription("sfp/v1/dev/+/up/smashed")
    for sub in (broad, specific, again):
        subs.add(sub)
    assert subs.first_for("sfp/v1/dev/a/up/smashed") is broad  # registered first
    assert subs.first_for("sfp/v1/dev/a/up/grad_z") is broad
    assert subs.first_for("sfp/v1/dev/a/down/task") is None
    assert subs.first_for("$SYS/broker/uptime") is None
    subs.remove(broad)
    assert subs.first_for("sfp/v1/dev/a/up/smashed") is specific
    assert subs.first_for("sfp/v1/dev/a/up/grad_z") is None
    subs.remove(specific)
    assert subs.first_for("sfp/v1/dev/a/up/smashed") is again
    assert subs.filters() == ["sfp/v1/dev/+/up/smashed"]


def test_a_puback_before_its_wait_is_kept_and_one_after_wakes_it() -> None:
    acks = PubAcks()
    acks.on_puback(1, OK)  # arrived before publish() returned the packet id
    assert acks.wait(1, timeout=0) is OK
    timer = threading.Timer(0.05, acks.on_puback, (2, OK))
    timer.start()
    assert acks.wait(2, timeout=5) is OK
    timer.join()
    assert acks.wait(3, timeout=0.01) is None


def test_pubacks_nobody_takes_are_not_kept() -> None:
    acks = PubAcks()
    acks.on_puback(1, OK)
    acks.ignore([1, 2])  # 1 came already, 2 comes later
    acks.on_puback(2, OK)
    assert acks.wait(3, timeout=0.01) is None  # gave up: its late PUBACK is dropped too
    acks.on_puback(3, OK)
    assert not acks._acks and not acks._unwanted
    acks.on_puback(2, OK)  # the id reused by a later publish that waits
    assert acks.wait(2, timeout=0) is OK


def test_a_suback_nobody_expects_is_reported_as_such() -> None:
    subacks = SubAcks()
    assert subacks.on_suback(7, [OK]) is False
    with subacks.lock:
        subacks.expect(8)
    assert subacks.on_suback(8, [OK]) is True
    with subacks.lock:
        assert subacks.wait(8, timeout=0) == [OK]
        subacks.expect(9)
        assert subacks.wait(9, timeout=0.01) is None


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: m.kind)
def test_decoding_with_the_peeked_header_equals_a_fresh_decode(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    head = peek(data)
    assert_same(decode(data, head=head), decode(data))
    assert_same(decode(data, head=head), decode(data))  # the header is not consumed


def test_packets_are_whole_up_to_the_limit_the_broker_allows() -> None:
    assert payload_limit(8 << 20, None) == 8 << 20
    assert payload_limit(8 << 20, 1 << 20) == (1 << 20) - PACKET_OVERHEAD
    assert payload_limit(4096, 1 << 20) == 4096
    small = Smashed(device_id="d", h=np.zeros((1, 2, 4), np.float32))
    assert packets_for(small, 4096) == [encode(small)]
    large = Smashed(device_id="d", h=np.zeros((1, 64, 64), np.float32))
    chunks = packets_for(large, 4096)
    assert len(chunks) > 1 and all(len(c) <= 4096 for c in chunks)
    assert all(isinstance(decode(c), Chunk) for c in chunks)


def test_one_tensor_spec_for_manifests_and_messages() -> None:
    spec = TensorSpec("h", "float32", (BATCH, 7, 8))
    assert spec.shape_matches((3, 7, 8)) and spec.dtype_matches(np.dtype("float32"))
    assert not spec.shape_matches((3, 7, 9)) and not spec.shape_matches((7, 8))
    assert not spec.dtype_matches(np.dtype("float16"))
