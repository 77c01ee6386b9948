"""What bench/bench_fleet.py makes of a fleet's run: step figures, the first bottleneck, tables.

A step counts in the window (latency, failures) if it was due in it; steps per second served are
the steps that succeeded and ended in the window, whenever due, per second of it.

Each part has a ceiling: the broker one core (Mosquitto runs on one thread), the server's
busiest thread one core (and one GIL for all its Python threads), a device process one core (the
load generator itself: a result is only as good as its generator), the body the steps per second
it allows alone (measured before the run), the bench's processes together the cores other
processes leave them. Steps served over the share of its ceiling a part used is what it could
serve at that ceiling, if its cost grows with the steps (a shared machine starves a part below
its ceiling, not its cost per step): the lowest is the first bottleneck.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

DUE, STARTED, FORWARD, TOTAL, BUSY, ERROR, MISSED = range(7)  # the columns of a step record


@dataclass(frozen=True)
class Window:
    """The measured span, in seconds from the schedule's start."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


def step_figures(
    records: Iterable[list[Any]], window: Window, devices: int, period_s: float
) -> dict[str, Any]:
    """Steps due in the window: served per second, latency percentiles, failures, and the
    slots missed because a step overran its period."""
    records = list(records)
    due = [r for r in records if window.start <= r[DUE] < window.end]
    missed = sum(r[MISSED] for r in due)
    ok = [r for r in due if r[ERROR] is None]
    ended = [
        r
        for r in records
        if r[ERROR] is None and window.start <= r[STARTED] + r[TOTAL] <= window.end
    ]
    totals = [r[TOTAL] for r in ok]
    forwards = [r[FORWARD] for r in ok if r[FORWARD] is not None]
    return {
        "offered_steps_per_s": devices / period_s,
        "served_steps_per_s": len(ended) / window.seconds,
        "steps": len(due),
        "failed_steps": len(due) - len(ok),
        "failures": dict(Counter(r[ERROR] for r in due if r[ERROR] is not None)),
        "busy_retries": int(sum(r[BUSY] for r in due)),
        "missed_pct": 100 * missed / max(len(due) + missed, 1),
        "latency_ms": {
            "p50": percentile_ms(totals, 50),
            "p99": percentile_ms(totals, 99),
            "max": percentile_ms(totals, 100),
            "forward_p50": percentile_ms(forwards, 50),
            "forward_p99": percentile_ms(forwards, 99),
        },
    }


def join_figures(readies: list[dict]) -> dict[str, Any]:
    seconds = [s for ready in readies for s in ready["seconds"]]
    failures: Counter[str] = Counter()
    for ready in readies:
        failures.update(ready["failures"])
    return {
        "joined": sum(ready["joined"] for ready in readies),
        "join_p50_s": float(np.median(seconds)) if seconds else None,
        "join_max_s": max(seconds, default=None),
        "join_failures": dict(failures),
    }


def fleet_row(
    size: int,
    period_s: float,
    window: Window,
    readies: list[dict],
    results: list[dict],
    figures: dict[str, Any],
    body_ceiling: float | None,
) -> dict[str, Any]:
    """Everything measured of one fleet, from the device processes' `ready` and `result` lines
    and the monitor's `figures`, with its first bottleneck."""
    records = [record for result in results for record in result["records"]]
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for result in results:
        sent.update(result["traffic"]["sent"])
        received.update(result["traffic"]["received"])
    row = {
        "devices": size,
        "processes": len(readies),
        "period_s": period_s,
        "cores": psutil.cpu_count(),
        **join_figures(readies),
        **step_figures(records, window, size, period_s),
        **figures,
        "device_bytes": {"sent": dict(sent), "received": dict(received)},
        "tasks_received": sum(result["tasks"] for result in results),
        "body_ceiling_steps_per_s": body_ceiling,
    }
    roles = [role for role in ("server", "workers", "broker", "generators") if role in row]
    row["bench_cpu_pct"] = sum(row[role]["cpu_pct"] for role in roles)
    steps = max(row["served_steps_per_s"], 1e-9)  # a cost that sharing the cores hardly changes
    row["cpu_ms_per_step"] = {role: 10 * row[role]["cpu_pct"] / steps for role in roles}
    all_cores = 100.0 * row["cores"]
    machine = row["machine_busy_pct"] / 100 * all_cores
    row["others_cpu_pct"] = max(0.0, machine - row["bench_cpu_pct"])
    row["cpu_left_pct"] = max(1.0, all_cores - row["others_cpu_pct"])  # to the bench's processes
    row["bottleneck"] = bottleneck(row)
    return row


# ---- the first bottleneck ------------------------------------------------------------------
Ceiling = tuple[str, Callable[[dict], float | None], str]
CEILINGS: list[Ceiling] = [
    ("broker", lambda r: r["broker"]["cpu_pct"] / 100, "of its one core"),
    ("server thread", lambda r: r["server"]["top_thread_pct"] / 100, "of one core"),
    ("server GIL", lambda r: _share(r.get("server_gil_pct")), "of the time held"),
    (
        "worker thread",
        lambda r: r["workers"]["top_thread_pct"] / 100 if r.get("workers") else None,
        "of one core",
    ),
    ("load generator", lambda r: r["generators"]["top_process_pct"] / 100, "of one core"),
    ("body compute", lambda r: _body_share(r), "of the steps/s it allows alone"),
    ("machine CPUs", lambda r: r["bench_cpu_pct"] / r["cpu_left_pct"], "of the CPU left to it"),
]


def _share(pct: float | None) -> float | None:
    return None if pct is None else pct / 100


def _body_share(row: dict) -> float | None:
    """Steps served over those the body allows alone; None where that ceiling was not measured
    or is plainly low (more was served: measured while other processes held the cores)."""
    ceiling = row.get("body_ceiling_steps_per_s")
    if not ceiling or row["served_steps_per_s"] > ceiling:
        return None
    return row["served_steps_per_s"] / ceiling


def bottleneck(row: dict) -> dict[str, Any]:
    """Each part's ceiling in steps per second (the steps it served over the share of its own
    ceiling it used: what it could serve with that ceiling to itself), the lowest one as the
    first bottleneck, the fleet it would serve at a step per period, and whether this fleet
    was served in full."""
    served = row["served_steps_per_s"]
    utilisation, ceilings = {}, {}
    for name, measure, _ in CEILINGS:
        value = measure(row)
        if value is not None and math.isfinite(value) and value > 0:
            utilisation[name] = round(value, 3)
            ceilings[name] = round(served / value, 1)
    name = min(ceilings, key=ceilings.__getitem__)
    unit = next(u for n, _, u in CEILINGS if n == name)
    share = utilisation[name]
    label = name
    named = {"server thread": "server_threads", "worker thread": "workers_threads"}
    threads = row.get(named.get(name, ""))
    if threads:  # py-spy named it
        label = f"{name} {threads[0]['name']!r} (in {threads[0]['frame'] or '?'})"
    p99 = row["latency_ms"]["p99"]
    saturated = (
        served < 0.95 * row["offered_steps_per_s"]
        or row["failed_steps"] > 0
        or row["missed_pct"] > 1.0
        or (p99 is not None and p99 > 1e3 * row["period_s"] / 2)
    )
    text = (
        f"{label} at {share:.0%} {unit}, a ceiling of {ceilings[name]:.0f} steps/s (server "
        f"{row['server']['cpu_pct']:.0f}% of a core, its busiest thread "
        f"{row['server']['top_thread_pct']:.0f}%; broker {row['broker']['cpu_pct']:.0f}%; "
        f"generators {row['generators']['cpu_pct']:.0f}%; machine {row['machine_busy_pct']:.0f}% "
        f"busy of {row['cores']} cores, {row['others_cpu_pct']:.0f}% of a core by other processes)"
    )
    return {
        "component": name,
        "utilisation": share,
        "ceiling_steps_per_s": ceilings[name],
        "saturated": saturated,
        "projected_devices_at_ceiling": int(ceilings[name] * row["period_s"]),
        "utilisation_of_each": utilisation,
        "ceiling_steps_per_s_of_each": ceilings,
        "text": text,
    }


# ---- tables ---------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_tables(console: Console, rows: list[dict], setup: dict) -> None:
    throughput = Table(title=f"Split steps through the fleet ({setup['title']})")
    for column in (
        "devices", "procs", "joined", "offered/s", "served/s", "p50 ms", "p99 ms", "fwd p50 ms",
        "missed %", "busy", "failed",
    ):  # fmt: skip
        throughput.add_column(column, justify="right")
    for r in rows:
        lat = r["latency_ms"]
        throughput.add_row(
            str(r["devices"]), str(r["processes"]), str(r["joined"]),
            f"{r['offered_steps_per_s']:.1f}", f"{r['served_steps_per_s']:.1f}",
            _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["forward_p50"]), f"{r['missed_pct']:.1f}",
            str(r["busy_retries"]), _failures(r),
        )  # fmt: skip
    console.print(throughput)
    resources = Table(title="Resources over the window (CPU in % of one core, RSS in MiB)")
    for column in (
        "devices", "server CPU", "top thread", "server RSS", "workers CPU", "broker CPU",
        "broker RSS", "generators CPU", "others CPU", "broker msg/s in/out", "broker MB/s in/out",
    ):  # fmt: skip
        resources.add_column(column, justify="right")
    for r in rows:
        rates, workers = r["broker_rates"], r.get("workers")
        resources.add_row(
            str(r["devices"]), f"{r['server']['cpu_pct']:.0f}",
            f"{r['server']['top_thread_pct']:.0f}", f"{r['server']['rss_mib']:.0f}",
            "-" if not workers else f"{workers['cpu_pct']:.0f}",
            f"{r['broker']['cpu_pct']:.0f}", f"{r['broker']['rss_mib']:.0f}",
            f"{r['generators']['cpu_pct']:.0f}", f"{r['others_cpu_pct']:.0f}",
            f"{rates['publish_in']:.0f} / {rates['publish_out']:.0f}",
            f"{rates['bytes_in'] / 1e6:.1f} / {rates['bytes_out'] / 1e6:.1f}",
        )  # fmt: skip
    console.print(resources)
    for r in rows:
        for role in ("server", "workers"):
            if r.get(f"{role}_threads"):
                who = "server" if role == "server" else "worker 0"
                console.print(f"{r['devices']} devices, {who}: {_threads(r, role)}")
    for r in rows:
        costs = ", ".join(f"{k} {v:.2f} ms" for k, v in r["cpu_ms_per_step"].items())
        console.print(f"{r['devices']} devices, CPU per step served: {costs}")
    for r in rows:
        verdict = r["bottleneck"]
        state = "saturated" if verdict["saturated"] else "served in full"
        ahead = verdict["projected_devices_at_ceiling"]
        reach = f"; at that ceiling, {ahead} devices at a step per {r['period_s']:g} s"
        console.print(f"{r['devices']} devices, {state}: first bottleneck {verdict['text']}{reach}")


def _failures(row: dict) -> str:
    failed = row["failed_steps"] + sum(row["join_failures"].values())
    return str(failed) if failed == 0 else f"{failed} ({_top(row)})"


def _top(row: dict) -> str:
    reasons = Counter(row["failures"]) + Counter(row["join_failures"])
    return ", ".join(f"{k}: {v}" for k, v in reasons.most_common(2))


def _threads(row: dict, role: str) -> str:
    """The busiest threads by name: CPU, and how often a dump found each one holding the GIL."""
    parts = [
        f"{t['name']} {t['cpu_pct']:.0f}% CPU, GIL {t['gil_pct']:.0f}%"
        for t in row[f"{role}_threads"][:4]
    ]
    return f"GIL held {row[f'{role}_gil_pct']:.0f}% of the time; " + "; ".join(parts)
