"""Protocol bench: wire overhead, encoding error, codec speed, and broker round trips.

    python bench/bench_protocol.py [--quick]

Prints (rich tables):
  1. bytes on the wire / tensor bytes for fp32 SMASHED payloads (goal <= 1.01 at >= 1 MiB);
  2. per encoding: bytes vs fp32 and the error it adds (max abs, relative RMS) on N(0, 1) data;
  3. encode and decode throughput per encoding;
  4. round trips SMASHED -> BODY_OUT (same size) through a private loopback Mosquitto with the
     sfprompt client, as a ratio to raw paho publishes of the same bytes echoed in the same run
     (goal >= 0.9). The echoing server runs in its own process, as it would in a deployment,
     and answers from an inline handler, as the body service does.
     The raw baseline is why this script, alone outside `protocol/`, imports paho.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Console
from rich.table import Table

from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import ClientConfig, Inbound
from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.messages import ENCODINGS, BodyOut, Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from sfprompt.units import MIB

T = Topics()


def activation(nbytes: int, seed: int = 0) -> np.ndarray:
    """A (B, N, D) float32 activation of about `nbytes` bytes, D = 768 as in ViT-Base."""
    rows = max(1, nbytes // (4 * 768))
    return np.random.default_rng(seed).standard_normal((1, rows, 768), np.float32)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def wire_overhead(console: Console, sizes: list[int]) -> None:
    table = Table(
        title="1. fp32 SMASHED: bytes on the wire / tensor bytes (goal <= 1.01 at >= 1 MiB)"
    )
    for column in ("tensor", "wire bytes", "ratio"):
        table.add_column(column, justify="right")
    for size in sizes:
        h = activation(size)
        wire = len(encode(Smashed(device_id="cam-01", h=h)))
        table.add_row(f"{h.nbytes / MIB:.3f} MiB", f"{wire:,}", f"{wire / h.nbytes:.5f}")
    console.print(table)


def encoding_error(console: Console, size: int) -> None:
    table = Table(title=f"2. Encodings on N(0,1) activations ({size // MIB} MiB fp32)")
    for column in ("encoding", "bytes / fp32", "max abs error", "relative RMS error"):
        table.add_column(column, justify="right")
    h = activation(size)
    for encoding in ENCODINGS:
        data = encode(Smashed(device_id="cam-01", h=h, encoding=encoding))
        back = decode(data)
        assert isinstance(back, Smashed)
        diff = back.h - h
        rms = float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(h**2)))
        table.add_row(
            encoding, f"{len(data) / h.nbytes:.4f}", f"{np.abs(diff).max():.3g}", f"{rms:.3g}"
        )
    console.print(table)


def codec_speed(console: Console, size: int, repeat: int) -> None:
    table = Table(title=f"3. Codec throughput, {size // MIB} MiB fp32 tensor (GB/s of fp32 data)")
    for column in ("encoding", "encode", "decode"):
        table.add_column(column, justify="right")
    h = activation(size)
    for encoding in ENCODINGS:
        message = Smashed(device_id="cam-01", h=h, encoding=encoding)
        data = encode(message)
        t_enc = best_time(lambda m=message: encode(m), repeat)
        t_dec = best_time(lambda d=data: decode(d), repeat)
        table.add_row(encoding, f"{h.nbytes / t_enc / 1e9:.2f}", f"{h.nbytes / t_dec / 1e9:.2f}")
    console.print(table)


def serve_echo(port: int, mode: str, ready: Event, stop: Event) -> None:
    """The server side, in its own process as in a deployment: echoes h back as z."""
    if mode == "raw":
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="raw-echo", protocol=paho.MQTTv5
        )
        client.on_message = lambda c, u, m: c.publish("raw/back", m.payload, qos=1)
        client.on_subscribe = lambda *args: ready.set()
        client.connect("127.0.0.1", port)
        client.subscribe("raw/up", qos=1)
        client.loop_start()
        stop.wait()
        client.disconnect()
        client.loop_stop()
        return

    def body(inbound: Inbound) -> Message:
        m = inbound.message
        return BodyOut(device_id=m.device_id, step=m.step, z=m.h)  # type: ignore[union-attr]

    server = MqttClient(ClientConfig("server", "127.0.0.1", port, max_chunk_bytes=256 * MIB))
    server.subscribe(T.all_up(), body, inline=True)  # as the body service does
    server.connect()
    ready.set()
    stop.wait()
    server.close()


def round_trips(port: int, mode: str, h: np.ndarray, count: int) -> float:
    """Seconds for `count` round trips of `h` (raw paho bytes, or SMASHED -> BODY_OUT).

    Device and server each run in a fresh process, as in a deployment, so that neither client
    inherits the memory state of this one (or of the previous trial)."""
    ctx = multiprocessing.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    seconds = ctx.Queue()
    server = ctx.Process(target=serve_echo, args=(port, mode, ready, stop), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise TimeoutError("echo server did not start")
        device = ctx.Process(target=run_device, args=(port, mode, h, count, seconds), daemon=True)
        device.start()
        elapsed: float = seconds.get(timeout=600)
        device.join(30)
        return elapsed
    finally:
        stop.set()
        server.join(30)


def run_device(port: int, mode: str, h: np.ndarray, count: int, seconds: Any) -> None:
    if mode == "raw":
        seconds.put(_raw_device(port, encode(Smashed(device_id="cam-01", h=h)), count))
    else:
        seconds.put(_sfprompt_device(port, h, count))


def _sfprompt_device(port: int, h: np.ndarray, count: int) -> float:
    device = MqttClient(ClientConfig("cam-01", "127.0.0.1", port, max_chunk_bytes=256 * MIB))
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    device.connect()
    try:
        start = time.perf_counter()
        for step in range(count):
            smashed = Smashed(device_id="cam-01", step=step, h=h)
            reply = device.request(T.up("cam-01", "smashed"), smashed, T.down("cam-01", "body_out"))
            assert isinstance(reply, BodyOut)
        return time.perf_counter() - start
    finally:
        device.close()


def _raw_device(port: int, payload: bytes, count: int) -> float:
    got, subscribed = threading.Event(), threading.Event()
    sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-sender", protocol=paho.MQTTv5)
    sender.on_message = lambda c, u, m: got.set()
    sender.on_subscribe = lambda *args: subscribed.set()
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    sender.subscribe("raw/back", qos=1)
    subscribed.wait(30)
    try:
        start = time.perf_counter()
        for _ in range(count):
            got.clear()
            sender.publish("raw/up", payload, qos=1)
            if not got.wait(60):
                raise TimeoutError("raw echo lost")
        return time.perf_counter() - start
    finally:
        sender.disconnect()
        sender.loop_stop()


def broker_round_trips(console: Console, sizes: list[int], trials: int) -> None:
    """Paired trials, alternating which of the two goes first so that drift on a busy machine
    hits both alike, after one untimed run of each (the first run on a fresh broker is
    faster than all later ones, whichever client makes it); the ratio is the median over
    pairs, with the range it spread over."""
    table = Table(title="4. Round trips via loopback Mosquitto (MiB/s of tensor data, both ways)")
    for column in ("tensor", "round trips", "raw paho", "sfprompt", "ratio (goal >= 0.9)", "range"):
        table.add_column(column, justify="right")
    with EmbeddedBroker() as broker:
        for mode in ("raw", "sfprompt"):
            round_trips(broker.port, mode, activation(MIB), 64)
        for size in sizes:
            h = activation(size)
            count = max(8, int(192 * MIB / max(size, MIB)))
            raw, ours = [], []
            for trial in range(trials):
                order = ("raw", "sfprompt") if trial % 2 == 0 else ("sfprompt", "raw")
                seconds = {mode: round_trips(broker.port, mode, h, count) for mode in order}
                raw.append(seconds["raw"])
                ours.append(seconds["sfprompt"])
            moved = 2 * count * h.nbytes / MIB
            ratios = sorted(r / o for r, o in zip(raw, ours, strict=True))
            table.add_row(
                f"{h.nbytes / MIB:.2f} MiB",
                str(count),
                f"{moved / statistics.median(raw):.0f}",
                f"{moved / statistics.median(ours):.0f}",
                f"{statistics.median(ratios):.3f}",
                f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and trials")
    args = parser.parse_args()
    console = Console()
    wire_overhead(console, [1024, 64 * 1024, MIB, 16 * MIB, 64 * MIB])
    encoding_error(console, 4 * MIB)
    codec_speed(console, 16 * MIB, 3 if args.quick else 5)
    sizes = [MIB, 16 * MIB] if args.quick else [MIB, 4 * MIB, 16 * MIB]
    broker_round_trips(console, sizes, 2 if args.quick else 8)


if __name__ == "__main__":
    main()
