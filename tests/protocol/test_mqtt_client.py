"""The client over a real Mosquitto: every kind in every encoding crosses, requests get their
own replies, a 64 MB payload crosses in chunks despite injected duplicates and reordering, bad
input is answered with ERROR while the receiver keeps working, and each message reaches the
application once."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import numpy as np
import pytest
from protocol_fixtures import assert_same, sample_messages

from sfprompt.protocol import errors
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import ClientConfig, Inbound, presence_will
from sfprompt.protocol.codec import encode
from sfprompt.protocol.errors import RemoteError, RequestTimeout
from sfprompt.protocol.messages import (
    BodyOut,
    GradH,
    GradZ,
    Message,
    Presence,
    ServerStatus,
    Smashed,
)
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.pool_messages import WorkerAssignment, WorkerPresence
from sfprompt.protocol.topics import DOWN_KINDS, UP_KINDS, Topics
from tests.helpers import wait_for

T = Topics()
MakeClient = Callable[..., MqttClient]


def _topic_for(message: Message) -> str:
    if isinstance(message, Presence):
        return T.presence(message.device_id)
    if isinstance(message, ServerStatus):
        return T.server_status()
    if isinstance(message, WorkerPresence):
        return T.worker_presence(message.device_id)
    if isinstance(message, WorkerAssignment):
        return T.worker_assignment(message.device_id)
    if message.kind in UP_KINDS:
        return T.up(message.device_id, message.kind)
    assert message.kind in DOWN_KINDS
    return T.down(message.device_id, message.kind)


def _echo_server(make_client: MakeClient, calls: list[str] | None = None) -> MqttClient:
    """A server that answers SMASHED with BODY_OUT (the cls token) and GRAD_Z with GRAD_H."""

    def answer(inbound: Inbound) -> Message | None:
        m = inbound.message
        if calls is not None:
            calls.append(m.msg_id)
        env = {"device_id": m.device_id, "round": m.round, "step": m.step}
        if isinstance(m, Smashed):
            return BodyOut(z=np.ascontiguousarray(m.h[:, :1]) * 2, encoding=m.encoding, **env)
        if isinstance(m, GradZ):
            return GradH(grad_h=np.repeat(m.grad_z, 7, axis=1), encoding=m.encoding, **env)
        return None

    server = make_client("server")
    server.subscribe(T.all_up(), answer)
    return server


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "bf16", "int8"])
def test_every_kind_crosses_the_broker(make_client: MakeClient, encoding: str) -> None:
    """Each message kind, published on its own topic, arrives intact (within its encoding)."""
    got: list[Message] = []
    receiver = make_client("watcher")
    receiver.subscribe(f"{T.root}/#", lambda inbound: got.append(inbound.message))
    sender = make_client("cam-01")
    messages = sample_messages(encoding)
    for message in messages:
        sender.publish(_topic_for(message), message)
    wait_for(lambda: len(got) == len(messages), what="all kinds")
    tolerance = {"fp32": 0.0, "fp16": 5e-3, "bf16": 3e-2, "int8": 3e-2}[encoding]
    for sent, arrived in zip(messages, got, strict=True):
        assert_same(sent, arrived, atol=tolerance)


def test_request_reply_matches_by_correlation(make_client: MakeClient) -> None:
    """Concurrent requests from several threads each get their own reply, matched by MQTT v5
    correlation data; a tail with no blocks sends only the cls token down and its gradient up."""
    _echo_server(make_client)
    device = make_client("cam-01")
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            for step in range(5):
                h = rng.standard_normal((2, 7, 8)).astype(np.float32)
                smashed = Smashed(device_id="cam-01", step=step, h=h)
                z = device.request(T.up("cam-01", "smashed"), smashed, T.down("cam-01", "body_out"))
                assert isinstance(z, BodyOut) and z.step == step
                np.testing.assert_array_equal(z.z, h[:, :1] * 2)
                grad = GradZ(device_id="cam-01", step=step, grad_z=z.z)
                g = device.request(T.up("cam-01", "grad_z"), grad, T.down("cam-01", "grad_h"))
                assert isinstance(g, GradH) and g.grad_h.shape == (2, 7, 8)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures


def test_64mb_payload_crosses_in_chunks_with_duplicates_and_reordering(tmp_path) -> None:
    """Over the broker's negotiated Maximum Packet Size (8 MiB), a 64 MB SMASHED is chunked;
    duplicated and reordered chunks still yield exactly one, exact, message."""
    limit = 8 << 20
    with EmbeddedBroker(tmp_path / "b", max_packet_size=limit) as broker:
        config = {"host": "127.0.0.1", "port": broker.port}
        receiver = MqttClient(ClientConfig("server", **config))
        got: list[Message] = []
        receiver.subscribe(T.all_up(), lambda inbound: got.append(inbound.message))
        receiver.connect()
        sender = MqttClient(ClientConfig("cam-01", **config)).connect()
        try:
            assert sender.max_packet_bytes == limit  # learnt from CONNACK
            h = np.random.default_rng(0).standard_normal((16, 1024, 1024), np.float32)  # 64 MiB
            message = Smashed(device_id="cam-01", h=h)
            packets = sender.packets(message)
            assert len(packets) >= 8 and all(len(p) <= limit - 4096 for p in packets)
            rng = random.Random(0)
            stream = packets + rng.sample(packets, 3)
            rng.shuffle(stream)
            for packet in stream:
                sender.publish_packets(T.up("cam-01", "smashed"), [packet])
            wait_for(lambda: len(got) == 1, timeout=120, what="64 MB message")
            arrived = got[0]
            assert isinstance(arrived, Smashed) and np.array_equal(arrived.h, h)
            sender.publish_packets(T.up("cam-01", "smashed"), packets[:2])  # late duplicates
            sender.publish(T.up("cam-01", "update"), sample_messages()[6])  # a marker behind them
            wait_for(lambda: len(got) == 2, what="marker")
            assert got[1].kind == "update"
        finally:
            sender.close()
            receiver.close()


def test_bad_input_is_answered_with_error_and_receiver_keeps_working(
    make_client: MakeClient,
) -> None:
    """Garbage, NaN and a spoofed device id each get an ERROR naming the problem; valid work
    before and after is unaffected."""
    calls: list[str] = []
    _echo_server(make_client, calls)
    device = make_client("cam-01")
    errors_seen: list[Message] = []
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: errors_seen.append(inbound.message))
    up, down = T.up("cam-01", "smashed"), T.down("cam-01", "body_out")
    ok = Smashed(device_id="cam-01", h=np.ones((1, 3, 4), np.float32))
    assert isinstance(device.request(up, ok, down), BodyOut)

    device.publish_packets(up, [b"\x00not a safetensors file"])
    wait_for(lambda: len(errors_seen) == 1, what="ERROR for garbage")
    assert errors_seen[0].kind == "error" and errors_seen[0].code == errors.MALFORMED  # type: ignore[union-attr]

    nan = Smashed(device_id="cam-01", h=np.full((1, 3, 4), np.nan, np.float32))
    with pytest.raises(RemoteError) as info:
        device.request(up, nan, down)
    assert info.value.error.code == errors.NOT_FINITE and info.value.error.answers == nan.msg_id

    spoof = Smashed(device_id="cam-02", h=np.ones((1, 3, 4), np.float32))
    with pytest.raises(RemoteError, match="device_id"):
        device.request(up, spoof, down)

    assert isinstance(device.request(up, ok.__class__(device_id="cam-01", h=ok.h), down), BodyOut)
    assert len(calls) == 2  # only the two valid requests reached the application


def test_duplicate_request_is_handled_once_and_answered_again(make_client: MakeClient) -> None:
    """A repeated request (QoS 1 redelivery, or a retry after a lost reply) does not run the
    handler again: the cached reply is sent, and the requester's application sees it once."""
    calls: list[str] = []
    _echo_server(make_client, calls)
    device = make_client("cam-01")
    replies: list[Message] = []
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: replies.append(inbound.message))
    request = Smashed(device_id="cam-01", h=np.ones((1, 3, 4), np.float32))
    packets = device.packets(request)
    for _ in range(3):
        device.publish_packets(
            T.up("cam-01", "smashed"), packets, False, T.down("cam-01", "body_out"), b"c1"
        )
    wait_for(lambda: len(replies) >= 1, what="reply")
    marker = sample_messages()[8]  # presence, behind the duplicates
    seen_marker: list[Message] = []
    device.subscribe(T.presence("cam-01"), lambda inbound: seen_marker.append(inbound.message))
    device.publish(T.presence("cam-01"), marker)
    wait_for(lambda: len(seen_marker) == 1, what="marker")
    assert calls == [request.msg_id] and len(replies) == 1


def test_request_timeout_raises(make_client: MakeClient) -> None:
    device = make_client("cam-01")
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    smashed = Smashed(device_id="cam-01", h=np.ones((1, 2), np.float32))
    with pytest.raises(RequestTimeout):
        device.request(T.up("cam-01", "smashed"), smashed, T.down("cam-01", "body_out"), 0.5)


def test_presence_will_and_retained_status(make_client: MakeClient) -> None:
    """The Last Will marks a device offline; a late subscriber gets retained state at once."""
    server = make_client("server")
    server.publish(T.server_status(), ServerStatus(device_id="*", state="waiting"), retain=True)
    presence: list[Message] = []
    server.subscribe(T.all_presence(), lambda inbound: presence.append(inbound.message))
    device = make_client("cam-01", will=presence_will("cam-01"))
    status: list[Message] = []
    device.subscribe(T.server_status(), lambda inbound: status.append(inbound.message))
    wait_for(lambda: len(status) == 1, what="retained status")
    assert status[0].state == "waiting"  # type: ignore[union-attr]
    device.publish(T.presence("cam-01"), Presence(device_id="cam-01", online=True), retain=True)
    wait_for(lambda: len(presence) == 1, what="online")
    device.close(send_will=True)
    wait_for(lambda: len(presence) == 2, what="offline from the Will")
    assert [p.online for p in presence] == [True, False]  # type: ignore[union-attr]


def test_wire_payload_is_plain_safetensors(make_client: MakeClient) -> None:
    """What crosses the broker is the codec's bytes, unchanged (captures stay readable)."""
    raw: list[bytes] = []
    message = sample_messages()[2]
    receiver = make_client("watcher")
    receiver.subscribe(T.all_up(), lambda inbound: raw.append(encode(inbound.message)))
    make_client("cam-01").publish(_topic_for(message), message)
    wait_for(lambda: len(raw) == 1)
    assert raw[0] == encode(message)


def test_inline_handler_runs_on_the_network_thread_and_answers(make_client: MakeClient) -> None:
    """An inline subscription decodes (chunks too) and answers on paho's network thread, not the
    dispatcher; a handler there that would wait for a PUBACK gets a clear error instead of
    hanging, which the requester receives as an ERROR."""
    server = make_client("server")
    threads: list[threading.Thread] = []

    def answer(inbound: Inbound) -> Message:
        threads.append(threading.current_thread())
        m = inbound.message
        assert isinstance(m, Smashed)
        if m.step == 1:
            server.publish(T.down(m.device_id, "task"), m)  # waits for a PUBACK: refused
        return BodyOut(device_id=m.device_id, step=m.step, z=m.h)

    server.subscribe(T.all_up_of("smashed"), answer, inline=True)
    device = make_client("cam-01", max_chunk_bytes=4096)
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    h = np.random.default_rng(0).standard_normal((1, 64, 64)).astype(np.float32)  # 4 chunks
    up, down = T.up("cam-01", "smashed"), T.down("cam-01", "body_out")
    reply = device.request(up, Smashed(device_id="cam-01", step=0, h=h), down)
    assert isinstance(reply, BodyOut)
    np.testing.assert_array_equal(reply.z, h)
    assert threads and threads[0] is not server._dispatcher
    assert threads[0] is not threading.main_thread()
    with pytest.raises(RemoteError) as info:
        device.request(up, Smashed(device_id="cam-01", step=1, h=h), down, timeout=10)
    assert "network thread" in str(info.value)
