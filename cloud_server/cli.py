"""`sfprompt-cloud`: the server's command line (a click group; each command calls one function).

Every option is a field of the command's config dataclass (`ServeConfig`, `WorkerConfig`,
`BrokerConfigOptions`), where its default and help live; see sfprompt/options.py.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from sfprompt.logging_setup import setup_logging
from sfprompt.options import Verbosity, build, configs_from, merged_values, options_from

from .broker_config import AddDevicesOptions, BrokerConfigOptions
from .config import ServeConfig, WorkerConfig

# The embedded broker runs only beside `serve`; a worker connects to the server's broker.
EMBEDDED_ONLY = ("listen", "devices", "embedded_port")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sfprompt cloud side: the training server, body workers and the broker set-up.

    \b
    Serve a federation on an embedded broker, with a server bundle and a test set:
      sfprompt-cloud serve --bundle bundle/server --test-data test.npz --rounds 20
    Devices then join with `sfprompt-edge start --broker <the URL it prints>`.
    """


@main.command()
@options_from(ServeConfig, Verbosity)
@click.pass_context
def serve(ctx: click.Context, **values: Any) -> None:
    """Run the federation: rounds of TASK -> device training -> UPDATE -> FedAvg -> evaluation.

    Holds the frozen body (CUDA when present) and answers every device's split-training
    requests, batching them across devices. After each round it writes
    OUT/checkpoint.safetensors and a line of OUT/metrics.jsonl; restarted with the same OUT it
    resumes from the last completed round, on the same broker address, and its devices join
    again by themselves.

    \b
    Without --broker it runs its own Mosquitto (ending with it) and logs the URL devices
    use, also written to OUT/broker_url. For devices on other machines:
      sfprompt-cloud serve --bundle bundle/server --test-data test.npz --listen 0.0.0.0:1883
      sfprompt-edge start ... --broker mqtt://<this host>:1883   (on each device)
    """
    from sfprompt.protocol.broker import BrokerError
    from sfprompt.protocol.bundle import BundleError
    from sfprompt.protocol.errors import TransportError

    from .checkpoint import CheckpointError
    from .server import serve as run_serve

    try:  # a bad bound or rule is named (e.g. "trim_fraction must be in [0, 0.5)")
        cfg, verbosity = configs_from(ctx, values, ServeConfig, Verbosity)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    setup_logging(verbosity.verbose, verbosity.quiet)
    try:
        history = run_serve(cfg)
    except (
        BrokerError,
        BundleError,
        CheckpointError,
        TransportError,
        TimeoutError,
        ValueError,
    ) as exc:
        raise click.ClickException(str(exc)) from exc
    if history:
        last = history[-1]
        click.echo(f"finished round {last['round']}: accuracy {last.get('accuracy')}")


@main.command()
@options_from(WorkerConfig, Verbosity, skip=EMBEDDED_ONLY)
@click.pass_context
def worker(ctx: click.Context, **values: Any) -> None:
    """Serve only the body, to this worker's share of the devices (scale-out on a GPU fleet).

    \b
    Elastic pool: workers join and leave at any time; each round's devices
    are spread over the live ones by --capacity, and a dead worker's devices
    move to the others mid-round:
      sfprompt-cloud serve --bundle b/server --broker mqtt://broker:1883 \\
          --worker-pool elastic
      CUDA_VISIBLE_DEVICES=0 sfprompt-cloud worker --bundle b/server \\
          --broker mqtt://broker:1883 --id gpu0
      CUDA_VISIBLE_DEVICES=1 sfprompt-cloud worker ... --id gpu1 --capacity 2

    \b
    Static pool: a fixed N, worker i serving the devices hashed to it:
      sfprompt-cloud serve --bundle b/server --broker mqtt://broker:1883 --body-workers 2
      sfprompt-cloud worker ... --index 0 --of 2
      sfprompt-cloud worker ... --index 1 --of 2
    """
    from sfprompt.protocol.bundle import BundleError
    from sfprompt.protocol.errors import TransportError

    from .server import run_worker

    cfg, verbosity = configs_from(ctx, values, WorkerConfig, Verbosity)
    setup_logging(verbosity.verbose, verbosity.quiet)
    try:
        run_worker(cfg)
    except (BundleError, TransportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("broker-config")
@options_from(BrokerConfigOptions, AddDevicesOptions)
@click.argument("more_devices", nargs=-1, metavar="")
@click.option(
    "--add",
    is_flag=True,
    help="Add --devices to the set-up already in --out: certificates and passwords, and their "
    "rules (dynsec: live, through mosquitto_ctrl as admin on the running broker at "
    "--broker-host; acl-file: in passwd, then send mosquitto SIGHUP).",
)
@click.pass_context
def broker_config(
    ctx: click.Context, more_devices: tuple[str, ...], add: bool, **values: Any
) -> None:
    """Write a production Mosquitto config for a fleet of devices.

    \b
    It writes, under OUT:
      mosquitto.conf   TLS listener, no anonymous access, persistence
      dynamic-security.json
                       users, hashed passwords, and a role per device: each
                       device may use only its own topics; the server all
                       (--access acl-file: files passwd and acl instead)
      certs/           CA, and the broker's certificate and key
      clients/ID/      per device (and server, admin): ca.crt, client.crt,
                       client.key, password -- copy that folder to the device
    Then run: mosquitto -c OUT/mosquitto.conf

    \b
    Example:
      sfprompt-cloud broker-config --out ./broker --hostname mqtt.example.org \\
          --devices cam-01 cam-02 cam-03
    Later, with the broker running:
      sfprompt-cloud broker-config --out ./broker --add --devices cam-04

    \b
    A site broker in front of it (docs/broker.md, "Beyond one node"):
      sfprompt-cloud broker-config --out ./central --devices cam-01 \\
          --site site-a=cam-02,cam-03
      sfprompt-cloud broker-config --out ./site-a --devices cam-02 cam-03 \\
          --bridge-to mqtt.example.org:8883 \\
          --bridge-credentials ./central/clients/site-a
    """
    from .broker_config import write_broker_config

    merged = merged_values(ctx, values)
    options = build(BrokerConfigOptions, merged)
    ids = tuple(d for item in (*options.devices, *more_devices) for d in item.split(",") if d)
    if add:
        _add_devices(options.out, ids, merged["broker_host"], options.days)
        return
    try:
        files = write_broker_config(replace(options, devices=ids))
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Wrote {files.config} for {len(ids)} device(s) and user {options.server_user!r}.")
    click.echo(f"Start it with: mosquitto -c {files.config}")
    out = options.out
    click.echo(f"Give each device its folder under {out / 'clients'} (keep certs/ca.key private).")
    if options.bridging.sites:
        click.echo("Each site broker gets its folder there too: its --bridge-credentials.")
    if options.bridging.bridge_to:
        click.echo(f"Its bridge to {' '.join(options.bridging.bridge_to)} starts with it.")


def _add_devices(out: Path, ids: tuple[str, ...], broker_host: str, days: int) -> None:
    from .broker_config import add_devices

    if not ids:
        raise click.UsageError("--add needs --devices ID...")
    try:
        done = add_devices(AddDevicesOptions(out, ids, broker_host, days))
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in done:
        click.echo(f"Added {line}.")
    click.echo(f"Give each new device its folder under {out / 'clients'}.")
