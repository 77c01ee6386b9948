"""`sfprompt-edge`: what runs on the device. Imports no PyTorch (unless --runtime torchscript)."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sfprompt.logging_setup import setup_logging
from sfprompt.options import Verbosity, configs_from, options_from
from sfprompt.protocol.bundle import BundleError

from .config import EdgeConfig
from .profile import ProfileConfig

console = Console(stderr=True)


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
@options_from(EdgeConfig, Verbosity)
@click.pass_context
def start(ctx: click.Context, **values: Any) -> None:
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
    from .device import BrokerRefused, DeviceFailure, EdgeDevice

    cfg, verbosity = configs_from(ctx, values, EdgeConfig, Verbosity)
    setup_logging(verbosity.verbose, verbosity.quiet, console)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        device = EdgeDevice(cfg, stop)
        rounds = device.run()
    except BrokerRefused as exc:
        raise _Refused(str(exc)) from exc
    except (BundleError, DeviceFailure, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"{cfg.device_id}: left after {rounds} round(s)")


@main.command()
@options_from(ProfileConfig)
@click.pass_context
def profile(ctx: click.Context, **values: Any) -> None:
    """Run the device's training steps on synthetic input; print peak memory and time per phase."""
    from .memory_budget import MemoryBudgetError
    from .profile import run_profile

    (cfg,) = configs_from(ctx, values, ProfileConfig)
    try:
        result = run_profile(cfg)
    except (BundleError, MemoryBudgetError) as exc:
        raise click.ClickException(str(exc)) from exc
    title = f"device profile of {cfg.bundle} at batch {cfg.batch} ({cfg.runtime}, micro-batch "
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
    if cfg.out is not None:
        Console().print(f"wrote {', '.join(str(f) for f in result.files)}")
        if len(result.files) == 1:
            hint = 'no memory_timeline.png: pip install "sfprompt[plots]" to draw it'
            Console().print(hint, markup=False)  # [plots] is not a rich style


class _Refused(click.ClickException):
    exit_code = 3  # the broker refused us for good: see `start --help`
