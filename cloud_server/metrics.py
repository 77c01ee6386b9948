"""Per-round metrics: a JSON-lines log that survives a crash, and an optional Prometheus endpoint.

The log is the record the plots and the benchmark read; the endpoint is for watching a live run.
Each line is written whole, flushed and fsync'd, so a crash tears at most the last line, which
readers skip and the next writer cuts off before it appends.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

# Per-device byte counters are named "bytes_<direction>_<phase>", e.g. "bytes_up_split".
BYTES_PREFIX = "bytes_"
DIRECTIONS = ("up", "down")


@dataclass
class RoundMetrics:
    round: int
    accuracy: float | None  # on the server's test set; None when not evaluated this round
    loss: float | None
    seconds: float  # wall time of the whole round
    # device id -> samples, bytes_up_split, bytes_down_split, bytes_down_task, bytes_up_update,
    # peak_rss_mb, local_loss, ...; for accepted updates also update_norm (L2 of the change),
    # weight (samples after the server's cap) and clipped (1 if scaled down to the clip norm)
    devices: dict[str, dict[str, float]] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (device, reason)
    params_before: str = ""  # fingerprints of the global weights, to check a resumed run
    params_after: str = ""
    eval_samples: int | None = None  # test images behind accuracy and loss; None: not evaluated
    missing: list[tuple[str, str]] = field(default_factory=list)  # selected, not accepted: why
    aggregation: str = ""  # the rule: fedavg, median or trimmed-mean
    model_refused: str = ""  # why the new global model was refused and the last good one kept
    excluded: list[str] = field(default_factory=list)  # devices no longer selected, so far

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (rejected pairs become two-item lists)."""
        out = asdict(self)
        out["rejected"] = [[device, reason] for device, reason in self.rejected]
        out["missing"] = [[device, why] for device, why in self.missing]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundMetrics:
        """Inverse of to_dict; raises ValueError naming a missing field."""
        try:
            return cls(
                round=data["round"],
                accuracy=data["accuracy"],
                loss=data["loss"],
                seconds=data["seconds"],
                devices={d: dict(v) for d, v in data.get("devices", {}).items()},
                selected=list(data.get("selected", [])),
                accepted=list(data.get("accepted", [])),
                rejected=[(device, reason) for device, reason in data.get("rejected", [])],
                params_before=data.get("params_before", ""),
                params_after=data.get("params_after", ""),
                eval_samples=data.get("eval_samples"),
                missing=[(device, why) for device, why in data.get("missing", [])],
                aggregation=data.get("aggregation", ""),
                model_refused=data.get("model_refused", ""),
                excluded=list(data.get("excluded", [])),
            )
        except KeyError as error:
            raise ValueError(f"round metrics: field {error.args[0]!r} is missing") from None

    def bytes_by_phase(self) -> dict[tuple[str, str], float]:
        """(direction, phase) -> bytes summed over devices, from the "bytes_*" keys."""
        totals: dict[tuple[str, str], float] = {}
        for values in self.devices.values():
            for name, value in values.items():
                key = _bytes_key(name)
                if key is not None:
                    totals[key] = totals.get(key, 0.0) + float(value)
        return totals


class MetricsLog:
    """Appends one JSON object per line; each write is flushed and fsync'd before returning."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _cut_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, m: RoundMetrics | dict[str, Any]) -> None:
        record = m.to_dict() if isinstance(m, RoundMetrics) else m
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """Every complete record; a torn last line (no newline) is skipped.

        Raises ValueError naming the file and line for a bad line anywhere else: that is not a
        crash but damage, and silently dropping rounds would skew every plot made from the log.
        """
        path = Path(path)
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # the last piece is "" or torn
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected an object, got {record!r}")
            records.append(record)
        return records


class PrometheusExporter:
    """Serves the latest round's metrics over HTTP on its own registry (not the global one, so
    several servers or tests in one process do not collide). Port 0 picks a free port: `port`."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        try:
            import prometheus_client as prom
        except ImportError as error:
            raise ImportError(
                "the Prometheus endpoint needs prometheus-client: pip install 'sfprompt[cloud]'"
            ) from error
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self._round = prom.Gauge("sfprompt_round", "Last completed round", registry=r)
        self._accuracy = prom.Gauge("sfprompt_accuracy", "Server test accuracy", registry=r)
        self._loss = prom.Gauge("sfprompt_loss", "Server test loss", registry=r)
        self._online = prom.Gauge("sfprompt_devices_online", "Devices connected", registry=r)
        self._selected = prom.Gauge(
            "sfprompt_devices_selected", "Devices selected last round", registry=r
        )
        self._accepted = prom.Gauge(
            "sfprompt_devices_accepted", "Updates accepted last round", registry=r
        )
        self._rejected = prom.Counter(
            "sfprompt_updates_rejected", "Updates refused", ["reason"], registry=r
        )
        self._bytes = prom.Counter(
            "sfprompt_bytes", "Bytes exchanged with devices", ["direction", "phase"], registry=r
        )
        self._models_refused = prom.Counter(
            "sfprompt_models_refused", "Rounds whose new global model was refused", registry=r
        )
        self._excluded = prom.Gauge(
            "sfprompt_devices_excluded", "Devices excluded for refused updates", registry=r
        )
        self._seconds = prom.Histogram(
            "sfprompt_round_seconds",
            "Wall time of one round",
            registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, math.inf),
        )
        started = prom.start_http_server(port, addr=host, registry=r)
        if started is None:  # prometheus-client < 0.20 gives no handle to stop the server
            raise RuntimeError("PrometheusExporter needs prometheus-client >= 0.20")
        self._server: WSGIServer = started[0]
        self._thread = started[1]

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def observe(self, m: RoundMetrics) -> None:
        self._round.set(m.round)
        if m.accuracy is not None:  # keep the last evaluated value on the dashboard
            self._accuracy.set(m.accuracy)
        if m.loss is not None:
            self._loss.set(m.loss)
        self._selected.set(len(m.selected))
        self._accepted.set(len(m.accepted))
        for _, reason in m.rejected:
            self._rejected.labels(reason=reason).inc()
        if m.model_refused:
            self._models_refused.inc()
        self._excluded.set(len(m.excluded))
        for (direction, phase), count in m.bytes_by_phase().items():
            self._bytes.labels(direction=direction, phase=phase).inc(count)
        self._seconds.observe(m.seconds)

    def set_online(self, n: int) -> None:
        self._online.set(n)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> PrometheusExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bytes_key(name: str) -> tuple[str, str] | None:
    """ "bytes_up_split" -> ("up", "split"); None for any other metric name."""
    if not name.startswith(BYTES_PREFIX):
        return None
    direction, _, phase = name[len(BYTES_PREFIX) :].partition("_")
    if direction not in DIRECTIONS or not phase:
        return None
    return direction, phase


def _cut_torn_tail(path: Path) -> None:
    """Truncate a last line that a crash left without its newline, so the next append starts
    on a fresh line instead of gluing two records together."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "r+b") as file:
        file.seek(size - 1)
        if file.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline (records are small; usually one block).
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 65536)
            file.seek(start)
            block = file.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())
