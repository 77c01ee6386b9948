"""Load test: thousands of simulated devices speaking the real protocol to a real server.

For each fleet size (--fleets): a Mosquitto of the bench's own on a free loopback port, with the
access rules `serve`'s embedded broker writes (a password per device, each confined to its own
topics); a real `sfprompt-cloud serve` (and --workers body workers) on a server bundle; and the
devices, in a few processes of at most --per-process each (bench/fleet_devices.py: paho waits
with select(), which takes file descriptors below 1024, three per client). Each device has its
own MQTT session and client id, announces its presence, JOINs, then runs one split step
(SMASHED -> BODY_OUT, GRAD_Z -> GRAD_H with random h of the bundle's shapes) per --period
seconds through the device's own SplitLink. Steps due in the first --warmup seconds are not
counted; the next --duration seconds are measured.

It prints split steps per second served against offered, p50/p99 of a step (SMASHED to
GRAD_H), missed slots, CPU (per process and busiest thread) and RSS of the server, its workers,
the broker and the generators, the broker's messages and bytes per second (its $SYS counters),
failures, and the first bottleneck; --out writes it all as JSON. The body's own cost per step
on this machine is measured once beforehand, as the ceiling it alone puts on steps per second.

    python bench/bench_fleet.py [--fleets 10,100,1000] [--period 10] [--duration 60]
        [--warmup 10] [--batch 8] [--encoding fp16] [--workers 0] [--max-packet BYTES]
        [--per-process 250] [--processes 1] [--bundle runs/bench_fleet/bundle]
        [--server-device auto] [--server-threads N] [--serve-arg=--max-wait-ms=2 ...]
        [--py-spy PATH] [--no-body-cost] [--work runs/bench_fleet]
        [--out runs/bench_fleet/fleet.json]

--max-packet sets the broker's Maximum Packet Size, so that larger messages travel chunked.
With py-spy (on the PATH, or --py-spy) the server's threads are named and the GIL's holder
sampled every 3 s. docs/cloud_server.md ("Load test") has the figures measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.* when run as a script

from bench.fleet_devices import DeviceSpec, Schedule, raise_open_files_limit
from bench.fleet_monitor import BrokerMonitor, ProcessWatch, ThreadSampler, measure
from bench.fleet_report import Window, fleet_row, print_tables
from bench.fleet_setup import (
    MONITOR_USER,
    ServerPlan,
    body_cost,
    ensure_bundle,
    monitored_access,
    start_server,
    start_worker,
    wait_for_log,
)
from sfprompt.cloud_server.broker_access import FleetAccess, fleet_passwords, worker_users
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.cloud_server.embedded_broker import SERVER_USER
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.edge_client.config import EdgeConfig
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.bundle import load_manifest
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.messages import ENCODINGS
from sfprompt.sim.run_split import stop_processes

HERE = Path(__file__).resolve().parent
EDGE = EdgeConfig.__dataclass_fields__  # the device's own defaults for its split exchanges
TIMEOUT_S, ATTEMPTS = EDGE["request_timeout_s"].default, EDGE["attempts"].default
STEP_LIMIT_S = 2 * (TIMEOUT_S + 60.0)  # two exchanges, each with SplitLink's 60 s of busy retries


@dataclass(frozen=True)
class Plan:
    """One bench run: the fleets share everything but their size."""

    bundle: Path  # an export's folder: device/ and server/
    server: ServerPlan
    work: Path  # each fleet's logs, configs and broker files, in fleet-N/
    period_s: float
    warmup_s: float
    duration_s: float
    batch: int
    encoding: str
    per_process: int
    min_processes: int
    body_ceiling: float | None  # steps/s the body alone allows (None: not measured)
    py_spy: str | None  # py-spy, to name the server's threads (None: not installed)
    max_packet: int | None  # the broker's Maximum Packet Size: larger messages travel chunked


class DeviceProcess:
    """One bench/fleet_devices.py process and the JSON lines it prints."""

    def __init__(self, spec: DeviceSpec, log: Path) -> None:
        self.log = log
        with open(log, "wb") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "fleet_devices.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        self._events: queue.Queue[dict] = queue.Queue(maxsize=8)  # it prints two
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.send(asdict(spec))

    def send(self, payload: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                self._events.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._events.put({"event": "exit"})

    def wait_for(self, event: str, timeout: float) -> dict:
        """The next line `event`; raises RuntimeError (with its log's end) if the process ends
        or `timeout` passes first."""
        try:
            got = self._events.get(timeout=timeout)
        except queue.Empty:
            got = {"event": "timeout"}
        if got.get("event") != event:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"device process: {got.get('event')} before {event}:\n{tail}")
        return got

    def stop(self, grace_s: float) -> None:
        """Let it close its devices' sessions for `grace_s`, then kill it."""
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_fleet(size: int, plan: Plan) -> dict[str, Any]:
    """One fleet against a fresh broker and server; the row of figures."""
    work = plan.work / f"fleet-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ids = [f"sim-{i:05d}" for i in range(size)]
    servers = (SERVER_USER, *worker_users(SERVER_USER, plan.server.workers), MONITOR_USER)
    clients = work / "broker" / "clients"
    fleet = FleetAccess(servers, tuple(ids), fleet_passwords(clients, [*servers, *ids]))
    broker = EmbeddedBroker(
        work / "broker",
        max_packet_size=plan.max_packet,
        access=monitored_access(fleet),
        die_with_parent=True,
    )
    started: list[subprocess.Popen[bytes]] = []
    devices: list[DeviceProcess] = []
    results: list[dict] = []
    with broker:
        password = fleet.passwords[MONITOR_USER]
        login = connection_config(broker.url, MONITOR_USER, username=MONITOR_USER)
        monitor = BrokerMonitor(replace(login, password=password)).connect()
        try:
            started = start_server_side(plan.server, broker.url, clients, size, work, monitor)
            server = started[0]
            devices = start_devices(ids, plan, broker.url, clients, work)
            readies = [d.wait_for("ready", 300 + size / 10) for d in devices]
            start = time.time() + 1.0
            schedule = Schedule(start, start + plan.warmup_s + plan.duration_s)
            for device in devices:
                device.send(asdict(schedule))
            watches = {
                "server": ProcessWatch.of("server", [server.pid]),
                "workers": ProcessWatch.of("workers", [p.pid for p in started[1:]]),
                "broker": ProcessWatch.of("broker", broker_pids()),
                "generators": ProcessWatch.of("generators", [d.proc.pid for d in devices]),
            }
            samplers = {  # the server, and the first worker
                name: ThreadSampler(plan.py_spy, watches[name].processes[0].pid)
                for name in ("server", "workers")
                if plan.py_spy and watches[name].processes
            }
            figures = measure(
                watches, samplers, monitor, schedule.start + plan.warmup_s, schedule.end
            )
            last_step = schedule.end - time.time() + STEP_LIMIT_S
            results = [d.wait_for("result", last_step + 60) for d in devices]
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}): see {work}")
        finally:
            for device in devices:
                device.stop(grace_s=60.0 if results else 0.0)
            monitor.close()
            stop_processes(started, grace_s=0.0)
    window = Window(plan.warmup_s, plan.warmup_s + plan.duration_s)
    return fleet_row(size, plan.period_s, window, readies, results, figures, plan.body_ceiling)


def start_server_side(
    plan: ServerPlan, url: str, clients: Path, size: int, work: Path, monitor: BrokerMonitor
) -> list[subprocess.Popen[bytes]]:
    """`serve`, then its workers; returns them (`serve` first) once all are ready."""
    started = [start_server(plan, url, clients, size, work)]
    try:
        for index in range(plan.workers):
            started.append(start_worker(plan, url, clients, index, work))
        for index, worker in enumerate(started[1:]):
            wait_for_log(worker, work / f"worker{index}.log", "serving on", 300)
        if not monitor.wait_for_state("waiting", 300):
            raise RuntimeError(f"the server never said it was waiting: see {work}/server.log")
    except BaseException:
        stop_processes(started, grace_s=0.0)
        raise
    return started


def start_devices(
    ids: list[str], plan: Plan, url: str, clients: Path, work: Path
) -> list[DeviceProcess]:
    count = min(len(ids), max(plan.min_processes, math.ceil(len(ids) / plan.per_process)))
    specs = [
        DeviceSpec(
            url=url,
            clients=str(clients),
            device_ids=ids[index::count],
            bundle=str(plan.bundle / "device"),
            batch=plan.batch,
            encoding=plan.encoding,
            period_s=plan.period_s,
            timeout_s=TIMEOUT_S,
            attempts=ATTEMPTS,
            seed=index,
        )
        for index in range(count)
    ]
    return [DeviceProcess(spec, work / f"devices{i}.log") for i, spec in enumerate(specs)]


def broker_pids() -> list[int]:
    """The Mosquitto this process started (the fleet's broker)."""
    children = psutil.Process().children()
    return [p.pid for p in children if "mosquitto" in p.name()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleets", default="10,100,1000", help="fleet sizes, comma-separated")
    parser.add_argument(
        "--period", type=float, default=10.0, help="seconds between a device's steps"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds not counted first")
    parser.add_argument("--batch", type=int, help="samples per step (default: the bundle's)")
    parser.add_argument("--encoding", default=RoundConfig.encoding, choices=ENCODINGS)
    parser.add_argument(
        "--workers", type=int, default=0, help="body workers (serve --body-workers)"
    )
    parser.add_argument(
        "--max-packet", type=int, help="the broker's max_packet_size in bytes: chunks above it"
    )
    parser.add_argument("--per-process", type=int, default=250, help="devices per process at most")
    parser.add_argument("--processes", type=int, default=1, help="device processes at least")
    parser.add_argument("--bundle", type=Path, default=Path("runs/bench_fleet/bundle"))
    parser.add_argument("--server-device", default=BodyConfig.device, help="serve --device")
    parser.add_argument("--server-threads", type=int, help="serve --threads (CPU)")
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="one more serve flag, e.g. --serve-arg=--max-wait-ms=2",
    )
    parser.add_argument(
        "--py-spy", default=shutil.which("py-spy"), help="py-spy, to name the server's threads"
    )
    parser.add_argument("--no-body-cost", action="store_true", help="skip measuring the body alone")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_fleet"), help="logs, configs")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/bench_fleet/fleet.json"), help="JSON of every figure"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.per_process <= 300:
        parser.error("--per-process: 1 to 300 (paho's select() takes descriptors below 1024)")
    return args


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a log: the tables' columns in full
        console = Console(width=180)
    open_files = raise_open_files_limit()
    bundle = ensure_bundle(args.bundle)
    manifest = load_manifest(bundle / "device", verify=False)
    batch = args.batch or manifest.export_batch
    body = BodyConfig(device=args.server_device, threads=args.server_threads)
    if batch > body.max_batch:
        raise SystemExit(f"--batch {batch} is above serve's --max-batch {body.max_batch}")
    cost = None if args.no_body_cost else body_cost(bundle / "server", body, batch)
    if cost:
        console.print(
            f"body alone ({cost['device']}): {cost['step_ms_alone']:.1f} ms per step of {batch} "
            f"samples, {cost['step_ms_stacked']:.1f} ms ({cost['cpu_ms_stacked']:.1f} ms of CPU) "
            f"per step stacked by {cost['stacked']}: "
            f"at most {cost['ceiling_steps_per_s']:.0f} steps/s"
        )
    plan = Plan(
        bundle=bundle,
        server=ServerPlan(bundle / "server", body, args.workers, tuple(args.serve_arg)),
        work=args.work,
        period_s=args.period,
        warmup_s=args.warmup,
        duration_s=args.duration,
        batch=batch,
        encoding=args.encoding,
        per_process=args.per_process,
        min_processes=args.processes,
        body_ceiling=cost["ceiling_steps_per_s"] if cost else None,
        py_spy=args.py_spy,
        max_packet=args.max_packet,
    )
    if not args.py_spy:
        console.print("py-spy not found: the server's threads are not named (pip install py-spy)")
    rows = []
    for size in (int(s) for s in args.fleets.split(",")):
        console.print(f"[bold]{size} devices[/bold] ...")
        rows.append(run_fleet(size, plan))
        console.print(f"  {rows[-1]['bottleneck']['text']}")
    setup = {
        "title": f"{manifest.model} {manifest.tokens}x{manifest.embed_dim}, batch {batch}, "
        f"{args.encoding}, a step per {args.period:g} s per device, {args.workers} workers"
        + (f", packets of at most {args.max_packet} bytes" if args.max_packet else ""),
        "bundle": str(bundle),
        "max_packet": args.max_packet,
        "batch": batch,
        "encoding": args.encoding,
        "period_s": args.period,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "workers": args.workers,
        "serve_args": args.serve_arg,
        "open_files_limit": open_files,
        "cores": psutil.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
    }
    print_tables(console, rows, setup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "body": cost, "fleets": rows}, indent=2) + "\n")
    console.print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
