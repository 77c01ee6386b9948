"""`sfprompt-edge`: what runs on the device. Imports no PyTorch (unless --runtime torchscript)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sfprompt.config_file import merge_config
from sfprompt.logging_setup import setup_logging
from sfprompt.protocol.bundle import BundleError

from .runtime import RUNTIMES

console = Console(stderr=True)

_BUNDLE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train prompt + tail on this device, its images never leaving it.

    \b
    1. check the device can hold the bundle (and pick a micro-batch for 300 MB):
         sfprompt-edge profile --bundle bundle/device --batch 8 --memory-budget 300
    2. join a federation and train round after round until stopped (SIGTERM/Ctrl-C),
       with the folder `sfprompt-cloud broker-config` wrote for this device:
         sfprompt-edge start --bundle bundle/device --data ~/images \\
             --broker mqtts://broker.example:8883 --device-id pi-07 \\
             --tls-ca pi-07/ca.crt --tls-cert pi-07/client.crt \\
             --tls-key pi-07/client.key --password-file pi-07/password
       or, on a server's embedded broker (`sfprompt-cloud serve --listen 0.0.0.0:1883`):
         sfprompt-edge start --bundle bundle/device --data ~/images \\
             --broker mqtt://server:1883 --device-id pi-07
    """


@main.command()
@click.option("--bundle", type=_BUNDLE, help="The device bundle folder (sfprompt-export bundle).")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    help="Local images: an ImageFolder directory, CIFAR-10/100 binary batches or an .npz.",
)
@click.option(
    "--broker",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="mqtt://host:port or mqtts://host:port (user:password@ allowed).",
)
@click.option("--device-id", help="This device's id, also its broker user name.")
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default="onnx",
    show_default=True,
    help="onnx needs no PyTorch; torchscript for devices that have it (Jetson).",
)
@click.option("--tls-ca", help="CA certificate of the broker (switches TLS on).")
@click.option("--tls-cert", help="This device's client certificate.")
@click.option("--tls-key", help="This device's private key.")
@click.option("--username", help="Broker user name (default: from the URL).")
@click.option(
    "--password",
    envvar="SFPROMPT_BROKER_PASSWORD",
    show_envvar=True,
    help="Broker password (default: from the URL); prefer --password-file or the variable, "
    "which `ps` does not show.",
)
@click.option(
    "--password-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File whose first line is the password (broker-config writes clients/ID/password).",
)
@click.option(
    "--data-split",
    default="train",
    show_default=True,
    help="Which split of a CIFAR folder or train/test .npz pair to use.",
)
@click.option("--threads", type=int, help="Compute threads (default: up to 4 cores).")
@click.option(
    "--micro-batch",
    type=int,
    default=4,
    show_default=True,
    help="Samples the head graphs process at once; smaller uses less memory.",
)
@click.option(
    "--memory-budget",
    "memory_budget_mb",
    type=float,
    help="Peak MB allowed: picks the largest micro-batch that fits, or refuses.",
)
@click.option("--momentum", type=float, default=0.0, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option(
    "--request-timeout",
    "request_timeout_s",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for the server in split training.",
)
@click.option("--max-rounds", type=int, help="Leave after this many rounds.")
@click.option(
    "--leave-when-server-stops",
    is_flag=True,
    help="Leave once the server says the federation has finished.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="JSON or TOML file of these options (flags given here win).",
)
@click.option("-v", "--verbose", is_flag=True, help="Also log debugging details.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
@click.pass_context
def start(
    ctx: click.Context, config_file: Path | None, verbose: bool, quiet: bool, **flags: Any
) -> None:
    """Join a federation and serve round after round until stopped.

    Each round: train prompt + tail on the local loss and keep the hardest samples (EL2N),
    split-train them with the server, then upload prompt + tail. Stops cleanly on SIGTERM or
    Ctrl-C; survives a lost broker (reconnects) and missed rounds (joins the next). It logs
    when it connects, joins, starts and ends a round (kept samples, loss, bytes, peak memory),
    and when the broker or the server goes and comes back.

    \b
    Exit status: 0 left as asked (--max-rounds, --leave-when-server-stops, a signal);
    1 cannot take part (bundle, data, the server refused the bundle); 2 bad usage;
    3 the broker refused us for good (user or password, client id, TLS certificate,
    unknown host): retrying cannot help, so it does not. A broker that is down or
    unreachable for a while is retried with backoff, saying so each time.
    """
    from .device import BrokerRefused, DeviceFailure, EdgeConfig, EdgeDevice

    setup_logging(verbose, quiet, console)
    values = merge_config(ctx, flags, config_file)
    for name in ("bundle", "data", "device_id"):
        if values.get(name) is None:
            raise click.UsageError(f"--{name.replace('_', '-')} is required (flag or config)")
    values["bundle"], values["data"] = Path(values["bundle"]), Path(values["data"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        device = EdgeDevice(EdgeConfig(**values), stop)
        rounds = device.run()
    except BrokerRefused as exc:
        raise _Refused(str(exc)) from exc
    except (BundleError, DeviceFailure, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"{values['device_id']}: left after {rounds} round(s)")


@main.command()
@click.option(
    "--bundle",
    required=True,
    type=_BUNDLE,
    help="The device bundle folder written by `sfprompt-export bundle`.",
)
@click.option("--batch", default=8, show_default=True, help="Batch size to profile.")
@click.option("--steps", default=5, show_default=True, help="Training steps to run.")
@click.option("--threads", type=int, help="Compute threads (default: up to 4 cores).")
@click.option(
    "--micro-batch",
    default=4,
    show_default=True,
    help="Samples the head graphs process at once; smaller uses less memory.",
)
@click.option("--runtime", type=click.Choice(RUNTIMES), default="onnx", show_default=True)
@click.option(
    "--memory-budget",
    "memory_budget_mb",
    type=float,
    help="Peak MB allowed: picks the largest micro-batch that fits, or refuses.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write profile.json and memory_timeline.png here.",
)
def profile(
    bundle: Path,
    batch: int,
    steps: int,
    threads: int | None,
    micro_batch: int,
    runtime: str,
    memory_budget_mb: float | None,
    out: Path | None,
) -> None:
    """Run the device's training steps on synthetic input; print peak memory and time per phase."""
    from .memory_budget import MemoryBudgetError
    from .profile import ProfileConfig, run_profile

    cfg = ProfileConfig(
        bundle,
        batch,
        steps,
        threads,
        micro_batch,
        out=out,
        runtime=runtime,
        memory_budget_mb=memory_budget_mb,
    )
    try:
        result = run_profile(cfg)
    except (BundleError, MemoryBudgetError) as exc:
        raise click.ClickException(str(exc)) from exc
    title = f"device profile of {bundle} at batch {batch} ({runtime}, micro-batch "
    table = Table(title=title + f"{result.micro_batch})")
    for col in ("phase", "peak RSS MB", "USS MB", "ms / call", "CPU ms / call", "calls"):
        table.add_column(col, justify="right")
    for p in result.phases.values():
        table.add_row(
            p.name,
            f"{p.peak_rss_mb:.0f}",
            f"{p.uss_mb:.0f}",
            f"{1000 * p.seconds / p.calls:.1f}",
            f"{1000 * p.cpu_seconds / p.calls:.1f}",
            str(p.calls),
        )
    Console().print(table)
    Console().print(f"peak RSS {result.peak_rss_mb:.0f} MB")
    if out is not None:
        Console().print(f"wrote {out / 'profile.json'} and {out / 'memory_timeline.png'}")


class _Refused(click.ClickException):
    exit_code = 3  # the broker refused us for good: see `start --help`
