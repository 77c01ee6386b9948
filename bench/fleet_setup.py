"""The real parts bench/bench_fleet.py runs a fleet against: a bundle, a Mosquitto of its own,
`sfprompt-cloud serve` (and its body workers), and what the body alone costs per step.

The broker is the server's embedded broker as `serve` makes it (`FleetAccess`: a password per
device, each device confined to its own topics, the server side on the whole tree), started by
the bench on a free loopback port, plus: read access to `$SYS` for the server side (the bench's
monitor logs in as one more server user), `$SYS` every second, and no cap on connections. The
server is told to wait for one device more than the fleet has, so it runs no round and only
serves split steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sfprompt.broker_login import BrokerLogin
from sfprompt.cloud_server.broker_access import FleetAccess, worker_users, write_dynsec_config
from sfprompt.cloud_server.config import (
    BodyConfig,
    BrokerSettings,
    ModelSource,
    ServeConfig,
    WorkerConfig,
)
from sfprompt.cloud_server.embedded_broker import SERVER_USER
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.options import write_config

BIN = Path(sys.executable).parent
MONITOR_USER = "bench-monitor"  # the bench's own session on the broker ($SYS, server status)
SYS_TOPICS = "$SYS/#"
# The tests' small ViT (tests/bundles.py SMALL_VIT): 32x32 images, patch 8, 4 blocks, 4 prompts;
# h is (B, 21, 192). Its body costs little on a CPU, so that the protocol is what is measured.
DEFAULT_EXPORT = (
    "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg",
    "patch_size=8", "--model-arg", "depth=4", "--prompts", "4", "--random-init",
)  # fmt: skip


def ensure_bundle(out: Path) -> Path:
    """An export's folder (device/ and server/): `out` if it holds one, else the small ViT
    exported there by `sfprompt-export bundle` (about a minute, once)."""
    if (out / "device" / "manifest.json").is_file() and (
        out / "server" / "manifest.json"
    ).is_file():
        return out
    print(f"exporting the bench's bundle to {out} (once)", file=sys.stderr)
    command = [str(BIN / "sfprompt-export"), "bundle", *DEFAULT_EXPORT, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sfprompt-export failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return out


def monitored_access(fleet: FleetAccess) -> Callable[[Path], list[str]]:
    """`fleet.write` (the access rules `serve`'s embedded broker uses), plus `$SYS` read access
    for the server's role, `$SYS` every second and no cap on connections."""

    def write(folder: Path) -> list[str]:
        lines = fleet.write(folder)
        dynsec = folder / "dynamic-security.json"
        if any(line.startswith("plugin_opt_config_file") for line in lines):
            config = json.loads(dynsec.read_text())
            for role in config["roles"]:
                if role["rolename"] == fleet.servers[0]:
                    role["acls"] += [
                        {"acltype": "subscribePattern", "topic": SYS_TOPICS, "allow": True},
                        {"acltype": "publishClientReceive", "topic": SYS_TOPICS, "allow": True},
                    ]
            write_dynsec_config(dynsec, config)
        else:  # acl_file: `topic` lines after a `user` line are that user's
            with open(folder / "acl", "a") as acl:
                acl.write(f"user {MONITOR_USER}\ntopic read {SYS_TOPICS}\n")
        return [*lines, "sys_interval 1", "max_connections -1"]

    return write


@dataclass(frozen=True)
class ServerPlan:
    """How `serve` (and its workers) run for a fleet."""

    bundle: Path  # the server bundle
    body: BodyConfig
    workers: int  # 0: the body runs in `serve`
    extra_args: tuple[str, ...] = ()  # more `serve` flags, as given to the bench


def login(clients: Path, user: str) -> BrokerLogin:
    return BrokerLogin(user, password_file=clients / user / "password")


def start_server(
    plan: ServerPlan, url: str, clients: Path, fleet_size: int, work: Path
) -> subprocess.Popen[bytes]:
    """`sfprompt-cloud serve` on the broker at `url`, waiting for more devices than there are."""
    defaults = RoundConfig()
    rounds = RoundConfig(
        rounds=1,
        min_devices=fleet_size + 1,
        wait_for_devices_s=1e6,
        max_devices=max(defaults.max_devices, fleet_size + 1),
    )
    cfg = ServeConfig(
        source=ModelSource(bundle=plan.bundle),
        broker=BrokerSettings(url=url, login=login(clients, SERVER_USER)),
        rounds=rounds,
        body=plan.body,
        out=work / "server",
        body_workers=plan.workers,
        progress=False,
    )
    path = write_config(work / "serve.json", cfg)
    command = [str(BIN / "sfprompt-cloud"), "serve", "--config", str(path), *plan.extra_args]
    return _process(command, work / "server.log")


def start_worker(
    plan: ServerPlan, url: str, clients: Path, index: int, work: Path
) -> subprocess.Popen[bytes]:
    """`sfprompt-cloud worker` number `index` of `plan.workers`."""
    cfg = WorkerConfig(
        source=ModelSource(bundle=plan.bundle),
        broker=BrokerSettings(
            url=url, login=login(clients, worker_users(SERVER_USER, plan.workers)[index])
        ),
        body=plan.body,
        index=index,
        workers=plan.workers,
    )
    path = write_config(work / f"worker{index}.json", cfg)
    command = [str(BIN / "sfprompt-cloud"), "worker", "--config", str(path)]
    return _process(command, work / f"worker{index}.log")


def _process(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )


def wait_for_log(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> None:
    """Until `text` is in the process's log; raises RuntimeError (with the log's end) if the
    process ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited ({proc.returncode})" if proc.poll() is not None else "timed out"
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{log.stem} {why} before saying {text!r}; its log ends:\n{tail}")
        time.sleep(0.2)


def body_cost(server_bundle: Path, body: BodyConfig, batch: int, stacked: int = 16) -> dict:
    """What the body alone costs per split step (forward + VJP) on this machine, one device's
    batch at a time and `stacked` devices' batches in one call (as the batcher stacks them):
    the ceiling the body puts on steps per second, whatever the protocol does. The fastest of
    a few calls: on a shared machine the others are slowed by other processes."""
    import numpy as np

    from sfprompt.cloud_server.body_model import ServerModel

    model = ServerModel.from_bundle(server_bundle, body)
    rng = np.random.default_rng(0)

    def step_s(samples: int, repeats: int = 7) -> tuple[float, float]:
        """(wall, CPU) seconds of the fastest call: CPU counts every thread of this process."""
        h = rng.standard_normal(model.h_shape(samples), dtype=np.float32)
        grad_z = rng.standard_normal(model.z_shape(samples), dtype=np.float32)
        times = []
        for _ in range(repeats + 1):  # the first warms up
            started, cpu = time.perf_counter(), time.process_time()
            model.body_forward(h)
            model.body_vjp(h, grad_z)
            times.append((time.perf_counter() - started, time.process_time() - cpu))
        return min(times[1:])

    alone, together = step_s(batch)[0], step_s(batch * stacked)
    return {
        "device": str(model.device),
        "batch": batch,
        "step_ms_alone": 1e3 * alone,
        "step_ms_stacked": 1e3 * together[0] / stacked,
        "cpu_ms_stacked": 1e3 * together[1] / stacked,
        "stacked": stacked,
        "ceiling_steps_per_s": stacked / together[0],
    }
