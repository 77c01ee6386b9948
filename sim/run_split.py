"""Run one split method as a real federation on this machine and read back what it measured.

An embedded Mosquitto, one `sfprompt-cloud serve` process and one `sfprompt-edge start` process
per device (with torch made unloadable, as on a Raspberry Pi), all on loopback. The broker admits
only these processes, each with a password made for this run and confined to its own topics, as
the server's own embedded broker does. SFPrompt and its
ablations differ only in the server's phase settings; SFL+Linear uses a bundle without prompts
and neither pruning nor the local phase. Bytes are what crossed the wire; device memory is the
peak RSS each device measured with psutil; FLOPs are counted from the model's shape.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from timm.models.vision_transformer import VisionTransformer

from sfprompt.broker_login import BrokerLogin
from sfprompt.cloud_server.broker_access import FleetAccess, fleet_passwords
from sfprompt.cloud_server.config import BrokerSettings, ModelSource, ServeConfig
from sfprompt.cloud_server.metrics import MetricsLog
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.edge_client.config import EdgeConfig
from sfprompt.edge_client.defenses import Defense
from sfprompt.export.split_vit import Cut
from sfprompt.options import Verbosity, write_config
from sfprompt.protocol.broker import EmbeddedBroker

from .costs import Links, round_minutes, sfprompt_round_flops
from .results import MethodResult, RoundRecord

BIN = Path(sys.executable).parent
NO_TORCH = (
    "import sys\n"
    "for name in ('torch', 'timm', 'torchvision'):\n"
    "    sys.modules[name] = None  # a device trains without PyTorch\n"
    "from sfprompt.edge_client.cli import main\n"
    "sys.argv = ['sfprompt-edge', 'start', *sys.argv[1:]]\n"
    "main()\n"
)


def method_settings(method: str, base: RoundConfig) -> RoundConfig:
    """SFPrompt's ablations switch one phase off; SFL+Linear switches both off."""
    if method == "sfprompt":
        return base
    if method == "sfprompt_global_prune":
        return replace(base, prune="global")
    if method == "sfprompt_no_prune":
        return replace(base, keep_ratio=1.0)
    if method == "sfprompt_no_local":
        return replace(base, local_epochs=0)
    if method == "sfl_linear":
        return replace(base, keep_ratio=1.0, local_epochs=0)
    raise ValueError(f"{method} is not run as a split federation here")


@dataclass(frozen=True)
class CostModel:
    """What the FLOPs and the round-time estimate are computed from."""

    vit: VisionTransformer
    cut: Cut
    links: Links


def run_split_method(
    method: str,
    server_bundle: Path,
    device_bundle: Path,
    shards: list[Path],
    test: Path,
    settings: RoundConfig,
    costs: CostModel,
    out: Path,
    progress: Callable[[int, float | None], None] = lambda done, accuracy: None,
) -> MethodResult:
    """Run the federation to its last round; raises RuntimeError naming the process that failed."""
    if out.exists():  # a fresh federation: the server would resume an old run's checkpoint
        shutil.rmtree(out)
    out.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    ids = [f"device-{i:03d}" for i in range(len(shards))]
    clients = out / "broker" / "clients"  # one password per process, made for this run
    fleet = FleetAccess((SERVER_USER,), tuple(ids), fleet_passwords(clients, [SERVER_USER, *ids]))
    with EmbeddedBroker(out / "broker", access=fleet.write) as broker:
        broker.start()
        rounds = replace(settings, min_devices=len(ids), wait_for_devices_s=300.0)
        server = _server(_Login(broker.url, SERVER_USER, clients), server_bundle, test, rounds, out)
        devices = [
            _device(_Login(broker.url, device_id, clients), device_bundle, shard, out)
            for device_id, shard in zip(ids, shards, strict=True)
        ]
        finished = False
        try:
            _wait(server, devices, out / "server" / "metrics.jsonl", settings.rounds, progress)
            finished = True
        finally:  # on Ctrl-C or an error, stop every process at once
            stop_processes([server, *devices], grace_s=30.0 if finished else 0.0)
    lines = MetricsLog.read(out / "server" / "metrics.jsonl") if finished else []
    if server.returncode != 0 or len(lines) < settings.rounds:
        tail = (logs / "server.log").read_text()[-2000:]
        raise RuntimeError(
            f"{method}: the server stopped after {len(lines)} of {settings.rounds} rounds "
            f"(exit {server.returncode}); its log ends:\n{tail}"
        )
    return _result(method, len(shards), lines, settings, costs)


SERVER_USER = "server"


@dataclass(frozen=True)
class _Login:
    """Where a process connects and as whom (its password file is clients/<user>/password)."""

    url: str
    user: str
    clients: Path

    @property
    def credentials(self) -> BrokerLogin:
        return BrokerLogin(self.user, password_file=self.clients / self.user / "password")


def _server(login: _Login, bundle: Path, test: Path, rounds: RoundConfig, out: Path):  # noqa: ANN202
    """`sfprompt-cloud serve --config OUT/config/server.json`, the file written from ServeConfig."""
    cfg = ServeConfig(
        source=ModelSource(bundle=bundle),
        broker=BrokerSettings(url=login.url, login=login.credentials),
        rounds=rounds,
        out=out / "server",
        test_data=test,
        eval_samples=100000,
        progress=False,
    )
    path = write_config(_config_path(out, "server"), cfg, Verbosity(verbose=True))
    args = [str(BIN / "sfprompt-cloud"), "serve", "--config", str(path)]
    log = out / "logs" / "server.log"
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _device(login: _Login, bundle: Path, shard: Path, out: Path):  # noqa: ANN202
    """`sfprompt-edge start --config OUT/config/<device id>.json` without torch, written from
    EdgeConfig."""
    cfg = EdgeConfig(
        bundle=bundle,
        data=shard,
        device_id=login.user,
        broker=login.url,
        login=login.credentials,
        threads=1,
        leave_when_server_stops=True,
    )
    path = write_config(_config_path(out, login.user), cfg)
    log = out / "logs" / f"{login.user}.log"
    args = [sys.executable, "-c", NO_TORCH, "--config", str(path)]
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def _config_path(out: Path, name: str) -> Path:
    (out / "config").mkdir(exist_ok=True)
    return out / "config" / f"{name}.json"


def _wait(server, devices, metrics: Path, rounds: int, progress) -> None:  # noqa: ANN001
    done = 0
    while server.poll() is None:
        time.sleep(0.5)
        lines = MetricsLog.read(metrics) if metrics.exists() else []
        if len(lines) > done:
            done = len(lines)
            progress(done, lines[-1].get("accuracy"))
        if any(d.poll() not in (None, 0) for d in devices) and not lines:
            raise RuntimeError("a device process failed before the first round; see its log")


def stop_processes(procs: list[subprocess.Popen], grace_s: float) -> None:
    """Let processes end by themselves for `grace_s` (devices leave once the server has
    finished), then SIGTERM them (a clean stop), then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _result(
    method: str, clients: int, lines: list[dict], s: RoundConfig, costs: CostModel
) -> MethodResult:
    result = MethodResult(method, clients)
    result.notes.append(
        "bytes measured on the wire (MQTT payloads); memory is each device's peak RSS"
    )
    defense = Defense.from_settings(s.settings(deadline=0.0))
    if defense.active:
        result.notes.append(f"devices' defense: {defense.describe()}")
    for line in lines:
        stats = [v for d, v in line["devices"].items() if d in line["accepted"]]
        if not stats:
            continue
        up = np.mean([v.get("bytes_up_split", 0) + v.get("bytes_up_update", 0) for v in stats])
        down = np.mean([v.get("bytes_down_split", 0) + v.get("bytes_down_task", 0) for v in stats])
        local = np.mean([v.get("local_samples", 0) for v in stats])
        kept = np.mean([v.get("kept", 0) for v in stats])
        scored = int(local) if s.local_epochs == 0 and s.keep_ratio < 1.0 else 0
        device_flops, server_flops = sfprompt_round_flops(
            costs.vit, costs.cut, int(local), s.local_epochs, int(kept), 1, scored
        )
        result.rounds.append(
            RoundRecord(
                round=line["round"],
                accuracy=float(line["accuracy"]),
                loss=float(line["loss"]),
                bytes_up=float(up),
                bytes_down=float(down),
                device_flops=float(device_flops),
                device_peak_mb=float(np.max([v.get("peak_rss_mb", 0) for v in stats])),
                seconds=float(line["seconds"]),
                est_round_minutes=round_minutes(device_flops, server_flops, up, down, costs.links),
                measured={"bytes": True, "memory": True, "flops": False},
            )
        )
    return result
