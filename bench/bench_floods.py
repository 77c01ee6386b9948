"""Floods against the server's memories: what each one costs the receiver, in time and memory.

Each scenario runs in a fresh process (so that RSS growth is its own) and prints one row:
what the flood holds (RSS growth, bytes counted against a budget), what it costs per item, and
whether a legitimate request still gets through. Run it on two trees to compare, e.g. the
committed code (a `git archive` of HEAD put first on the path) against the working tree.

    chunks-devices  N dangling 2-byte chunk sets of N devices (an anonymous broker), then a
                    legitimate 1 MiB chunked message: time per chunk, RSS, time to reassemble
    chunks-one      N dangling sets from one device: how many are held
    padded          200 chunk sets whose first chunk has a 1 MiB header: RSS against counted
    claims          two 256 MiB chunk-set claims from one device, then another device's 8 MiB
    dup-expiry      a chunk replayed every 60 s for 10 minutes: did its set ever expire?
    big-batch       one SMASHED of 1,000 samples: body time and RSS (small ViT, CPU)
    queue           2,000 queued body requests of 32 samples while the body is busy
    steps           300 SMASHED never followed by GRAD_Z (32 samples each)
    joins           2,000 JOINs with made-up ids: how many would be selected
    mqtt            N dangling sets over a real Mosquitto from N device topics, then a chunked
                    SMASHED request: its latency, and the server's RSS before and after

    python bench/bench_floods.py [--sets 5000] [--only SCENARIO ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def dangling(device_id: str, number: int, total_bytes: int = 2) -> Any:
    """The first chunk of a set whose other chunks never come (chunks of one byte)."""
    from sfprompt.protocol.messages import Chunk

    return Chunk(
        device_id=device_id,
        msg_id=f"m{number}",
        index=0,
        count=total_bytes,
        chunk_size=1,
        total_bytes=total_bytes,
        sha256="0" * 64,
        data=np.zeros(1, np.uint8),
    )


def legit_chunks(
    size: int, device_id: str = "cam-01", chunk_bytes: int = 64 << 10
) -> tuple[bytes, list[Any]]:
    """A SMASHED of `size` bytes of h, encoded, and its chunks decoded as a receiver meets them."""
    from sfprompt.protocol.chunking import split
    from sfprompt.protocol.codec import decode, encode
    from sfprompt.protocol.messages import Smashed

    h = np.random.default_rng(0).standard_normal((1, size // 4)).astype(np.float32)
    message = Smashed(device_id=device_id, round=1, step=1, h=h)
    payload = encode(message)
    return payload, [decode(p) for p in split(payload, message, chunk_bytes)]


def add_counting(reassembler: Any, chunks: list[Any]) -> tuple[int, Any]:
    """Add each chunk; returns (refused, completed payload or None)."""
    refused, done = 0, None
    for chunk in chunks:
        try:
            out = reassembler.add(chunk)
        except ValueError:
            refused += 1
            continue
        if out is not None:
            done = out
    return refused, done


def counted(reassembler: Any) -> float | None:
    value = getattr(reassembler, "buffered_bytes", None)
    return None if value is None else value / 2**20


# ---- scenarios (each returns a row) ------------------------------------------------------------


def chunks_devices(sets: int) -> dict:
    from sfprompt.protocol.chunking import Reassembler

    flood = [dangling(f"dev-{i}", i) for i in range(sets)]
    reassembler = Reassembler()
    before = rss_mb()
    started = time.perf_counter()
    tail = max(1, sets // 10)
    refused, _ = add_counting(reassembler, flood[:-tail])
    tail_started = time.perf_counter()
    more, _ = add_counting(reassembler, flood[-tail:])
    ended = time.perf_counter()
    growth = rss_mb() - before
    payload, chunks = legit_chunks(1 << 20)
    legit_started = time.perf_counter()
    _, done = add_counting(reassembler, chunks)
    legit_s = time.perf_counter() - legit_started
    return {
        "flood_s": ended - started,
        "us_per_chunk_last_10pct": 1e6 * (ended - tail_started) / tail,
        "held_sets": reassembler.pending,
        "refused": refused + more,
        "rss_growth_mb": growth,
        "counted_mb": counted(reassembler),
        "legit_ok": done is not None and bytes(done) == payload,
        "legit_ms": 1e3 * legit_s,
    }


def chunks_one(sets: int) -> dict:
    from sfprompt.protocol.chunking import Reassembler

    reassembler = Reassembler()
    started = time.perf_counter()
    refused, _ = add_counting(reassembler, [dangling("mallory", i) for i in range(sets)])
    flood_s = time.perf_counter() - started
    payload, chunks = legit_chunks(1 << 20)
    _, done = add_counting(reassembler, chunks)
    return {
        "flood_s": flood_s,
        "held_sets": reassembler.pending,
        "refused": refused,
        "legit_ok": done is not None and bytes(done) == payload,
    }


def padded_packet(chunk: Any, header_bytes: int) -> bytes:
    """`chunk` encoded with its JSON header padded by spaces to `header_bytes`: legal JSON."""
    from sfprompt.protocol.codec import encode

    payload = encode(chunk)
    length = int.from_bytes(payload[:8], "little")
    header = payload[8 : 8 + length].rstrip(b" ")
    header += b" " * (header_bytes - len(header))
    return len(header).to_bytes(8, "little") + header + payload[8 + length :]


def padded(_: int) -> dict:
    from sfprompt.protocol.chunking import Reassembler
    from sfprompt.protocol.codec import decode

    reassembler = Reassembler()
    before = rss_mb()
    refused = 0
    for i in range(200):
        try:
            reassembler.add(decode(padded_packet(dangling(f"dev-{i}", i, 16), (1 << 20) - 8)))
        except ValueError:
            refused += 1
    return {
        "held_sets": reassembler.pending,
        "refused": refused,
        "rss_growth_mb": rss_mb() - before,
        "counted_mb": counted(reassembler),
    }


def claims(_: int) -> dict:
    from sfprompt.protocol.chunking import Reassembler

    reassembler = Reassembler()
    before = rss_mb()
    errors = []
    for number in (1, 2):
        try:
            reassembler.add(dangling("mallory", number, total_bytes=256 << 20))
            errors.append("held")
        except ValueError as exc:
            errors.append(getattr(exc, "code", "refused"))
    payload, chunks = legit_chunks(8 << 20)
    refused, done = add_counting(reassembler, chunks)
    return {
        "claims": ",".join(errors),
        "rss_growth_mb": rss_mb() - before,
        "counted_mb": counted(reassembler),
        "legit_ok": done is not None and bytes(done) == payload,
        "legit_chunks_refused": refused,
    }


def dup_expiry(_: int) -> dict:
    from sfprompt.protocol.chunking import Reassembler

    now = [0.0]
    reassembler = Reassembler(clock=lambda: now[0])  # default ttl 120 s
    chunk = dangling("mallory", 1, total_bytes=4)
    expired = 0
    while now[0] <= 600:
        expired += len(reassembler.expire())
        reassembler.add(chunk)
        now[0] += 60
    # 0: one set held the whole time; more: each set ended ttl_s after it began (a replay
    # after that starts a new set, counted against the budgets like any other)
    return {"times_expired_in_600s": expired}


def small_model() -> Any:
    from sfprompt.cloud_server.body_model import ServerModel
    from sfprompt.cloud_server.config import BodyConfig
    from sfprompt.export.config import ExportConfig

    vit = {"img_size": 32, "patch_size": 8, "depth": 4}
    cfg = ExportConfig(num_classes=5, model_args=vit, prompts=3, seed=1)
    return ServerModel.from_timm(cfg, BodyConfig(device="cpu", threads=1))


def big_batch(_: int) -> dict:
    import threading

    from sfprompt.cloud_server.batcher import BodyBatcher

    model = small_model()
    h = np.random.default_rng(0).standard_normal(model.h_shape(1000)).astype(np.float32)
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], psutil.Process().memory_info().rss / 2**20)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    answered = threading.Event()
    started = time.perf_counter()
    with BodyBatcher(model, 256, 0.0) as batcher:  # the server's default --max-batch
        try:
            batcher.forward(h, lambda result, error: answered.set())
            answered.wait(600)
            outcome = "ran"
        except ValueError as exc:
            outcome = f"refused {getattr(exc, 'code', '')}"
    seconds = time.perf_counter() - started
    done.set()
    return {"outcome": outcome, "seconds": seconds, "rss_peak_growth_mb": peak[0] - before}


def queue(_: int) -> dict:
    from sfprompt.cloud_server.batcher import BodyBatcher

    model = small_model()
    batcher = BodyBatcher(model, 256, 0.005)  # not started: the body is busy elsewhere
    before = rss_mb()
    refused = 0
    for i in range(2_000):
        h = np.full(model.h_shape(32), i, np.float32)  # its own pages
        try:
            batcher.forward(h, lambda result, error: None)
        except RuntimeError:
            refused += 1
    return {
        "queued": batcher.pending,
        "refused": refused,
        "rss_growth_mb": rss_mb() - before,
        "request_mb": np.zeros(model.h_shape(32), np.float32).nbytes / 2**20,
    }


def steps(_: int) -> dict:
    from sfprompt.cloud_server.step_state import StepStore

    store = StepStore()
    h_shape = (32, 20, 192)  # the small ViT's h for 32 samples (T = 16 + 1 + 3 prompts)
    before = rss_mb()
    for step in range(300):
        store.put(("mallory", 1, step), np.ones(h_shape, np.float32))
    return {
        "held_steps": len(store),
        "held_mb": store.nbytes / 2**20,
        "rss_growth_mb": rss_mb() - before,
    }


def joins(_: int) -> dict:
    from sfprompt.cloud_server.registry import Registry
    from sfprompt.protocol.messages import Join

    registry = Registry()
    for i in range(2_000):
        registry.join(Join(device_id=f"fake-{i}", bundle_hash="x", runtime={}, hardware={}))
    return {"known": len(registry._devices), "selectable": len(registry.online())}


def mqtt(sets: int) -> dict:
    from sfprompt.protocol.broker import EmbeddedBroker
    from sfprompt.protocol.client_config import ClientConfig
    from sfprompt.protocol.codec import encode
    from sfprompt.protocol.messages import BodyOut, Smashed
    from sfprompt.protocol.mqtt_client import MqttClient
    from sfprompt.protocol.topics import Topics

    topics = Topics()

    def answer(inbound: Any) -> Any:
        m = inbound.message
        env = {"device_id": m.device_id, "round": m.round, "step": m.step}
        return BodyOut(z=np.ascontiguousarray(m.h[:, :1]), **env)

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:

        def client(name: str, **options: Any) -> MqttClient:
            return MqttClient(ClientConfig(name, "127.0.0.1", broker.port, **options))

        server = client("server")
        server.subscribe(topics.all_up_of("smashed"), answer, inline=True)
        server.connect()
        flooder, device = client("flooder").connect(), client("cam-01", max_chunk_bytes=64 << 10)
        device.subscribe(topics.device_inbox("cam-01"), lambda inbound: None)
        device.connect()
        h = np.random.default_rng(1).standard_normal((4, 256, 256)).astype(np.float32)
        smashed = Smashed(device_id="cam-01", round=1, step=1, h=h)
        reply_to = topics.down("cam-01", "body_out")
        device.request(topics.up("cam-01", "smashed"), smashed, reply_to, 60)  # warm
        before = rss_mb()
        started = time.perf_counter()
        for i in range(sets):
            chunk = dangling(f"dev-{i}", i)
            topic = topics.up(f"dev-{i}", "smashed")
            flooder.publish_packets(topic, [encode(chunk)], timeout=None if i < sets - 1 else 600)
        published = time.perf_counter()
        smashed = Smashed(device_id="cam-01", round=1, step=2, h=h)
        device.request(topics.up("cam-01", "smashed"), smashed, reply_to, 600)
        answered = time.perf_counter()
        row = {
            "publish_s": published - started,
            "legit_after_flood_s": answered - published,
            "server_held_sets": server._reassembler.pending,
            "rss_growth_mb": rss_mb() - before,
        }
        for c in (device, flooder, server):
            c.close(send_will=False)
    return row


RUNS: dict[str, Callable[[int], dict]] = {
    "chunks-devices": chunks_devices,
    "chunks-one": chunks_one,
    "padded": padded,
    "claims": claims,
    "dup-expiry": dup_expiry,
    "big-batch": big_batch,
    "queue": queue,
    "steps": steps,
    "joins": joins,
    "mqtt": mqtt,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scenarios = list(RUNS)
    parser.add_argument("--sets", type=int, default=5_000)
    parser.add_argument("--only", nargs="*", choices=scenarios, default=scenarios)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=scenarios, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(RUNS[args.child](args.sets)))
        return
    import sfprompt.protocol.chunking as chunking

    print(f"sfprompt from {Path(chunking.__file__).parent.parent}, pid {os.getpid()}")
    rows = {}
    for name in args.only:
        cmd = [sys.executable, __file__, "--child", name, "--sets", str(args.sets)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            rows[name] = {"error": out.stderr.strip().splitlines()[-1:]}
        else:
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:15s} " + ", ".join(f"{k}={_fmt(v)}" for k, v in rows[name].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
