"""What bench/bench_fleet.py watches while a fleet runs: the broker's own counters, the CPU and
memory of each process and, where py-spy is installed, what the server's threads are doing.

The broker's counters come from its `$SYS` topics (published every `sys_interval`, 1 s in the
bench's broker), read through the protocol's `Transport` (raw deliveries: `$SYS` payloads are
plain numbers, not sfprompt messages); the same session reads the server's retained status, to
know when it is ready. CPU is read with psutil per process and per thread (one thread near 100%
of a core is a thread, or the GIL, at its limit, whatever the cores left), memory as RSS.
psutil knows threads by id only; `py-spy dump`, taken every few seconds, names them, says which
one holds the GIL and where each one is, so that the busiest thread is named (the batcher, paho's
network thread, the dispatcher) and the GIL's share of the time is measured.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil

from sfprompt.protocol.client_config import ClientConfig
from sfprompt.protocol.codec import decode
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import ServerStatus
from sfprompt.protocol.subscriptions import Subscription
from sfprompt.protocol.transport import Delivery, Transport
from sfprompt.units import MIB

SYS_FILTER = "$SYS/broker/#"
# The counters read (cumulative since the broker started), by a short name.
SYS_COUNTERS = {
    "publish_in": "$SYS/broker/publish/messages/received",
    "publish_out": "$SYS/broker/publish/messages/sent",
    "packets_in": "$SYS/broker/messages/received",
    "packets_out": "$SYS/broker/messages/sent",
    "bytes_in": "$SYS/broker/bytes/received",
    "bytes_out": "$SYS/broker/bytes/sent",
}
CLIENTS_CONNECTED = "$SYS/broker/clients/connected"
SYS_BURST_S = 0.2  # the broker's $SYS messages of one interval arrive within this


@dataclass(frozen=True)
class SysSnapshot:
    """The broker's counters as last published, and when they arrived (monotonic)."""

    values: dict[str, float]
    at: float


class BrokerMonitor:
    """One MQTT session that keeps the broker's latest `$SYS` values and the server's state."""

    def __init__(self, config: ClientConfig) -> None:
        self._values: dict[str, float] = {}
        self._at = 0.0
        self._own = {"messages": 0.0, "bytes": 0.0}  # what the broker sent this session
        self._lock = threading.Condition()
        self.server_state: str | None = None
        self._transport = Transport(config, self._on_delivery, closed=lambda: None)
        status = config.topics.server_status()
        for topic_filter in (SYS_FILTER, status):
            self._transport.subscribe(Subscription(topic_filter, lambda _: None, True), 30.0)
        self._status_topic = status

    def connect(self, timeout: float = 30.0) -> BrokerMonitor:
        self._transport.connect(timeout, started=lambda: None)
        return self

    def close(self) -> None:
        self._transport.close(send_will=False)

    def _on_delivery(self, delivery: Delivery) -> None:
        with self._lock:  # a PUBLISH's fixed header, topic and properties: about 40 bytes
            self._own["messages"] += 1
            self._own["bytes"] += len(delivery.payload) + len(delivery.topic) + 40
        if delivery.topic == self._status_topic:
            self._on_status(delivery.payload)
            return
        try:
            value = float(bytes(delivery.payload).split()[0])
        except (ValueError, IndexError):
            return  # e.g. the broker's version string
        with self._lock:
            self._values[delivery.topic] = value
            if time.monotonic() - self._at > SYS_BURST_S:  # the first of a burst
                self._at = time.monotonic()
            self._lock.notify_all()

    def _on_status(self, payload: bytes | bytearray) -> None:
        try:
            message = decode(payload)
        except ProtocolError:
            return
        if isinstance(message, ServerStatus):
            with self._lock:
                self.server_state = message.state
                self._lock.notify_all()

    def wait_for_state(self, state: str, timeout: float) -> bool:
        """Whether the server published `state` within `timeout`."""
        with self._lock:
            return self._lock.wait_for(lambda: self.server_state == state, timeout)

    def next_snapshot(self, timeout: float = 5.0) -> SysSnapshot:
        """The counters once the broker has published them again (so they are fresh). It sends
        them every `sys_interval` as a burst of messages (those that changed): the snapshot is
        read once the burst is in, and timed by its first message."""
        with self._lock:
            before = self._at
            self._lock.wait_for(lambda: self._at > before, timeout)
            burst = self._at
        time.sleep(SYS_BURST_S)
        with self._lock:
            values = {name: self._values.get(topic, 0.0) for name, topic in SYS_COUNTERS.items()}
            values["clients"] = self._values.get(CLIENTS_CONNECTED, 0.0)
            values["monitor_messages"] = self._own["messages"]
            values["monitor_bytes"] = self._own["bytes"]
            return SysSnapshot(values, burst)


def sys_rates(start: SysSnapshot, end: SysSnapshot) -> dict[str, float]:
    """Per-second rates of the broker's counters between two snapshots, less what the broker
    sent the monitor itself ($SYS and status: dozens of messages a second)."""
    span = max(end.at - start.at, 1e-9)

    def rate(name: str) -> float:
        return (end.values[name] - start.values[name]) / span

    rates = {name: rate(name) for name in SYS_COUNTERS}
    for sent in ("publish_out", "packets_out"):
        rates[sent] -= rate("monitor_messages")
    rates["bytes_out"] -= rate("monitor_bytes")
    return rates


@dataclass(frozen=True)
class CpuMark:
    at: float  # monotonic
    processes: dict[int, float]  # pid -> user + system CPU seconds
    threads: dict[tuple[int, int], float]  # (pid, thread id) -> CPU seconds


@dataclass
class ProcessWatch:
    """CPU and RSS of one role's processes (the server, the broker, the device processes)."""

    name: str
    processes: list[psutil.Process]
    peak_rss: float = 0.0  # bytes, summed over the processes, highest sample

    @classmethod
    def of(cls, name: str, pids: list[int]) -> ProcessWatch:
        return cls(name, [psutil.Process(pid) for pid in pids])

    def mark(self) -> CpuMark:
        processes, threads = {}, {}
        for proc in self.processes:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    processes[proc.pid] = times.user + times.system
                    for thread in proc.threads():
                        threads[(proc.pid, thread.id)] = thread.user_time + thread.system_time
            except psutil.Error:  # ended meanwhile: it counts no more
                continue
        return CpuMark(time.monotonic(), processes, threads)

    def sample_rss(self) -> None:
        rss = 0
        for proc in self.processes:
            try:
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)

    def thread_usage(self, start: CpuMark, end: CpuMark) -> dict[tuple[int, int], float]:
        """(pid, thread id) -> CPU in % of one core over the span."""
        span = max(end.at - start.at, 1e-9)
        return {
            key: 100 * (seconds - start.threads.get(key, 0.0)) / span
            for key, seconds in end.threads.items()
        }

    def usage(self, start: CpuMark, end: CpuMark) -> dict[str, float]:
        """CPU as % of one core over the span: all the processes together, the busiest one and
        the busiest thread; and the peak RSS sampled (all together), in MiB."""
        span = max(end.at - start.at, 1e-9)

        def spent(now: dict, before: dict) -> list[float]:
            return [now[key] - before.get(key, 0.0) for key in now] or [0.0]

        per_process = spent(end.processes, start.processes)
        return {
            "cpu_pct": 100 * sum(per_process) / span,
            "top_process_pct": 100 * max(per_process) / span,
            "top_thread_pct": 100 * max(spent(end.threads, start.threads)) / span,
            "rss_mib": self.peak_rss / MIB,
            "processes": float(len(self.processes)),
        }


@dataclass(frozen=True)
class MachineMark:
    at: float
    busy_s: float
    total_s: float


def machine_mark() -> MachineMark:
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(times)
    return MachineMark(time.monotonic(), total - idle, total)


def machine_busy_pct(start: MachineMark, end: MachineMark) -> float:
    """How busy all the machine's cores were over the span, in % of all of them."""
    return 100 * (end.busy_s - start.busy_s) / max(end.total_s - start.total_s, 1e-9)


# ---- what each thread is doing (py-spy) ------------------------------------------------------
_THREAD_LINE = re.compile(r'^Thread (0x[0-9a-fA-F]+|\d+) \(([^)]*)\)(?:: "(.*)")?')


@dataclass
class ThreadSamples:
    """What `py-spy dump` saw of one thread, over all the dumps taken."""

    name: str
    dumps: int = 0
    active: int = 0  # running (not waiting in a lock, a socket or a sleep)
    gil: int = 0  # holding the GIL
    frames: Counter[str] = field(default_factory=Counter)  # its innermost Python frame

    def figures(self, cpu_pct: float | None) -> dict[str, object]:
        share = 100 / max(self.dumps, 1)
        frame = self.frames.most_common(1)[0][0] if self.frames else ""
        return {
            "name": self.name,
            "cpu_pct": cpu_pct,
            "active_pct": share * self.active,
            "gil_pct": share * self.gil,
            "frame": frame,
        }


class ThreadSampler:
    """`py-spy dump` of one process every so often: its threads by name, and the GIL's holder."""

    def __init__(self, py_spy: str, pid: int) -> None:
        self.py_spy = py_spy
        self.pid = pid
        self.threads: dict[int, ThreadSamples] = {}
        self.dumps = 0
        self.gil_held = 0  # dumps in which some thread held the GIL

    def sample(self) -> None:
        """One dump now (nothing if py-spy fails, e.g. the process has ended)."""
        command = [self.py_spy, "dump", "--nonblocking", "--pid", str(self.pid)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return
        if done.returncode == 0:
            self.add_dump(done.stdout)

    def add_dump(self, text: str) -> None:
        """Count what one `py-spy dump` says: each thread's state and innermost frame."""
        self.dumps += 1
        held, current, framed = False, None, False
        for line in text.splitlines():
            match = _THREAD_LINE.match(line)
            if match:
                tid = int(match[1], 0)
                current = self.threads.setdefault(tid, ThreadSamples(match[3] or "?"))
                current.dumps += 1
                current.active += "active" in match[2]
                current.gil += "gil" in match[2]
                held = held or "gil" in match[2]
                framed = False
            elif current is not None and line.startswith("    ") and not framed:
                current.frames[line.strip()] += 1
                framed = True
        self.gil_held += held

    def busiest(self, cpu_by_tid: dict[int, float], top: int = 5) -> list[dict[str, object]]:
        """The `top` threads by CPU, named where a dump saw them."""
        ranked = sorted(cpu_by_tid, key=cpu_by_tid.__getitem__, reverse=True)[:top]
        unnamed = ThreadSamples("(native: no Python frames, e.g. a torch worker)")
        return [
            {"tid": tid, **self.threads.get(tid, unnamed).figures(cpu_by_tid[tid])}
            for tid in ranked
        ]

    @property
    def gil_pct(self) -> float:
        """In % of the dumps: how often some thread of the process held the GIL."""
        return 100 * self.gil_held / max(self.dumps, 1)


def measure(
    watches: dict[str, ProcessWatch],
    samplers: dict[str, ThreadSampler],
    monitor: BrokerMonitor,
    start: float,
    end: float,
    dump_every_s: float = 3.0,
) -> dict[str, Any]:
    """CPU, RSS, the broker's counters and (`samplers`) thread dumps from `start` to `end`
    (wall clock): the figures of a fleet's window."""
    time.sleep(max(0.0, start - time.time()))
    sys_start, machine_start = monitor.next_snapshot(), machine_mark()
    marks = {name: watch.mark() for name, watch in watches.items()}
    next_dump = time.time()
    while time.time() < end:
        for watch in watches.values():
            watch.sample_rss()
        if time.time() >= next_dump:
            for sampler in samplers.values():
                sampler.sample()
            next_dump = time.time() + dump_every_s
        time.sleep(min(1.0, max(0.0, end - time.time())))
    ends = {name: watch.mark() for name, watch in watches.items()}
    sys_end, machine_end = monitor.next_snapshot(), machine_mark()
    usage = {name: watch.usage(marks[name], ends[name]) for name, watch in watches.items()}
    if not watches["workers"].processes:
        usage.pop("workers")
    threads = {}
    for name, sampler in samplers.items():
        cpu = watches[name].thread_usage(marks[name], ends[name])
        cpu = {tid: pct for (pid, tid), pct in cpu.items() if pid == sampler.pid}
        threads[f"{name}_threads"] = sampler.busiest(cpu)
        threads[f"{name}_gil_pct"] = sampler.gil_pct
    return {
        **usage,
        **threads,
        "machine_busy_pct": machine_busy_pct(machine_start, machine_end),
        "broker_rates": sys_rates(sys_start, sys_end),
        "broker_clients": sys_end.values["clients"],
    }
