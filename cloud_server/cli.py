"""`sfprompt-cloud`: the server's command line (a click group; each command calls one function).

Commands are added with `@main.command(...)`; `serve` and `worker` join `broker-config` here.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from sfprompt.config_file import merge_config
from sfprompt.logging_setup import setup_logging

from .rounds import RoundConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sfprompt cloud side: the training server, body workers and the broker set-up.

    \b
    Serve a federation on an embedded broker, with a server bundle and a test set:
      sfprompt-cloud serve --bundle bundle/server --test-data test.npz --rounds 20
    Devices then join with `sfprompt-edge start --broker <the URL it prints>`.
    """


def _model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the body comes from and where it runs: shared by serve and worker."""
    options = [
        click.option(
            "--bundle",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Server bundle folder (sfprompt-export bundle ... /server).",
        ),
        click.option("--model", help="Or a timm model name, cut as the exporter cuts it."),
        click.option("--num-classes", type=int, default=10, show_default=True),
        click.option("--prompts", type=int, default=10, show_default=True),
        click.option("--head-blocks", type=int, default=1, show_default=True),
        click.option("--tail-blocks", type=int, default=0, show_default=True),
        click.option("--pretrained", is_flag=True, help="timm pre-trained weights (--model)."),
        click.option(
            "--weights",
            type=click.Path(exists=True, path_type=Path),
            help="A local checkpoint for --model.",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cuda", "cpu"]),
            default="auto",
            show_default=True,
            help="Where the body runs; auto takes CUDA if present.",
        ),
        click.option("--bf16", is_flag=True, help="bfloat16 autocast for the body."),
        click.option("--threads", type=int, help="CPU threads for the body."),
        click.option("--broker", help="mqtt[s]://host:port; default: start an embedded broker."),
        click.option("--username", help="Broker user name."),
        click.option(
            "--password",
            envvar="SFPROMPT_BROKER_PASSWORD",
            show_envvar=True,
            help="Broker password; prefer --password-file or the variable (`ps` shows flags).",
        ),
        click.option(
            "--password-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="File whose first line is the broker password (clients/server/password).",
        ),
        click.option("--tls-ca", help="CA certificate of the broker (switches TLS on)."),
        click.option("--tls-cert", help="Client certificate."),
        click.option("--tls-key", help="Client key."),
        click.option(
            "--max-batch",
            type=int,
            default=256,
            show_default=True,
            help="Samples per body call when batching across devices.",
        ),
        click.option(
            "--max-wait-ms",
            type=float,
            default=5.0,
            show_default=True,
            help="How long a body call waits for other devices' requests.",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, path_type=Path),
            help="JSON or TOML file of these options (flags given here win).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Also log debugging details."),
        click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def _split_config(values: dict[str, Any]) -> tuple[Any, Any, Any]:
    from .body_model import BodyConfig
    from .server import BrokerSettings, ModelSource

    source = ModelSource(
        bundle=_path(values.pop("bundle")),
        model=values.pop("model"),
        num_classes=values.pop("num_classes"),
        prompts=values.pop("prompts"),
        head_blocks=values.pop("head_blocks"),
        tail_blocks=values.pop("tail_blocks"),
        pretrained=values.pop("pretrained"),
        weights=_path(values.pop("weights")),
    )
    body = BodyConfig(
        device=values.pop("device"), bf16=values.pop("bf16"), threads=values.pop("threads")
    )
    broker = BrokerSettings(
        url=values.pop("broker"),
        username=values.pop("username"),
        password=values.pop("password"),
        password_file=_path(values.pop("password_file")),
        tls_ca=values.pop("tls_ca"),
        tls_cert=values.pop("tls_cert"),
        tls_key=values.pop("tls_key"),
        embedded_port=values.pop("embedded_port", None),
        listen=values.pop("listen", None),
        devices=values.pop("devices", None) or (),
    )
    return source, body, broker


def _path(value: Any) -> Path | None:
    return None if value is None else Path(value)


@main.command()
@_model_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default="runs/server",
    show_default=True,
    help="Checkpoint, metrics.jsonl and the embedded broker's files.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="Where the embedded broker listens: 0.0.0.0:1883 for devices on other machines "
    "(no TLS: a trusted network only). Default: where it listened the last time OUT was "
    "served, else 127.0.0.1 at a free port. A port already taken is refused.",
)
@click.option(
    "--devices",
    multiple=True,
    metavar="ID,...",
    help="Devices the embedded broker admits (`a,b` or repeated); each one's password is in "
    "OUT/broker/clients/ID/password.",
)
@click.option(
    "--embedded-port", type=int, help="Port of the embedded broker on 127.0.0.1 (see --listen)."
)
@click.option(
    "--test-data",
    type=click.Path(exists=True, path_type=Path),
    help="Server-side test set (ImageFolder, CIFAR binary, .npz), evaluated per round.",
)
@click.option("--eval-samples", type=int, default=2000, show_default=True)
@click.option("--rounds", type=int, default=10, show_default=True)
@click.option("--clients-per-round", type=int, help="Devices per round (default: --fraction).")
@click.option(
    "--fraction",
    type=float,
    default=1.0,
    show_default=True,
    help="Fraction of the online devices selected per round.",
)
@click.option(
    "--min-devices",
    type=int,
    default=1,
    show_default=True,
    help="A round starts only with this many devices online.",
)
@click.option(
    "--wait-for-devices",
    "wait_for_devices_s",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds to wait for --min-devices before giving up.",
)
@click.option(
    "--round-timeout",
    "round_timeout_s",
    type=float,
    default=600.0,
    show_default=True,
    help="Deadline of each round: later updates are rejected.",
)
@click.option(
    "--max-devices",
    type=int,
    default=10_000,
    show_default=True,
    help="Devices the server knows at most; a full registry forgets the longest offline.",
)
@click.option(
    "--offline-grace",
    "offline_grace_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds a device may be offline mid-round before it is no longer awaited.",
)
@click.option(
    "--server-lr",
    type=float,
    default=1.0,
    show_default=True,
    help="eta_g: new = old + eta_g * weighted mean(client - old).",
)
@click.option(
    "--keep-ratio",
    type=float,
    default=0.5,
    show_default=True,
    help="gamma: fraction of each device's data kept by EL2N pruning.",
)
@click.option(
    "--prune",
    type=click.Choice(["class", "global"]),
    default="class",
    show_default=True,
    help="EL2N keeps the hardest gamma of each class, or of the whole local set (the paper's "
    "rule; it drops whole classes while the classifier is biased).",
)
@click.option(
    "--local-epochs",
    type=int,
    default=1,
    show_default=True,
    help="Epochs of the local-loss phase (0 switches it off).",
)
@click.option("--local-lr", type=float, default=RoundConfig.local_lr, show_default=True)
@click.option("--split-lr", type=float, default=RoundConfig.split_lr, show_default=True)
@click.option("--split-epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option(
    "--encoding",
    type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
    default="fp32",
    show_default=True,
    help="How activations and gradients travel.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--aggregation",
    type=click.Choice(["fedavg", "median", "trimmed-mean"]),
    default=RoundConfig.aggregation,
    show_default=True,
    help="fedavg: sample-weighted mean; median / trimmed-mean: coordinate-wise and unweighted, "
    "robust to a minority of poisoned updates (docs/cloud_server.md, Robust aggregation).",
)
@click.option(
    "--trim-fraction",
    type=float,
    default=RoundConfig.trim_fraction,
    show_default=True,
    help="trimmed-mean: drop ceil(F * n) updates at each end of every coordinate.",
)
@click.option(
    "--clip-norm",
    type=float,
    default=RoundConfig.clip_norm,
    help="Scale each update's change (L2, all parameters) down to this norm. Default: off.",
)
@click.option(
    "--max-update-norm",
    type=float,
    default=RoundConfig.max_update_norm,
    show_default=True,
    help="Refuse an update whose change (L2, all parameters) is larger ('inf': no bound).",
)
@click.option(
    "--max-samples",
    type=int,
    default=RoundConfig.max_samples,
    show_default=True,
    help="The most weight one device can claim in FedAvg (also capped at its local_samples).",
)
@click.option(
    "--max-global-growth",
    type=float,
    default=RoundConfig.max_global_growth,
    show_default=True,
    help="Keep the last good model if the new one's norm exceeds this times the old one's.",
)
@click.option(
    "--max-refusals",
    type=int,
    default=RoundConfig.max_refusals,
    show_default=True,
    help="A device whose update is refused this many rounds in a row is no longer selected.",
)
@click.option(
    "--body-workers",
    type=int,
    default=0,
    show_default=True,
    help="0: run the body here; N: N `sfprompt-cloud worker`s serve it.",
)
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.option("--no-progress", is_flag=True, help="No progress bar (e.g. in logs).")
@click.pass_context
def serve(
    ctx: click.Context, config_file: Path | None, verbose: bool, quiet: bool, **flags: Any
) -> None:
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
    from .server import ServeConfig
    from .server import serve as run_serve

    setup_logging(verbose, quiet)
    values = merge_config(ctx, flags, config_file)
    source, body, broker = _split_config(values)
    try:  # a bad bound or rule is named (e.g. "trim_fraction must be in [0, 0.5)")
        rounds = RoundConfig(
            **{k: values.pop(k) for k in list(values) if k in RoundConfig.__dataclass_fields__}
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    cfg = ServeConfig(
        source=source,
        broker=broker,
        rounds=rounds,
        body=body,
        out=Path(values.pop("out")),
        test_data=_path(values.pop("test_data")),
        eval_samples=values.pop("eval_samples"),
        max_batch=values.pop("max_batch"),
        max_wait_ms=values.pop("max_wait_ms"),
        body_workers=values.pop("body_workers"),
        metrics_port=values.pop("metrics_port"),
        progress=not values.pop("no_progress"),
    )
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
@_model_options
@click.option("--index", type=int, default=0, show_default=True, help="This worker's number.")
@click.option(
    "--of",
    "workers",
    type=int,
    default=1,
    show_default=True,
    help="How many workers share the devices (serve --body-workers N).",
)
@click.pass_context
def worker(
    ctx: click.Context, config_file: Path | None, verbose: bool, quiet: bool, **flags: Any
) -> None:
    """Serve only the body, to this worker's share of the devices (scale-out on a GPU fleet).

    \b
    Start the server without a body, then one worker per GPU:
      sfprompt-cloud serve --bundle b/server --broker mqtt://broker:1883 --body-workers 2
      CUDA_VISIBLE_DEVICES=0 sfprompt-cloud worker --bundle b/server \\
          --broker mqtt://broker:1883 --index 0 --of 2
      CUDA_VISIBLE_DEVICES=1 sfprompt-cloud worker ... --index 1 --of 2
    """
    from sfprompt.protocol.bundle import BundleError
    from sfprompt.protocol.errors import TransportError

    from .server import WorkerConfig, run_worker

    setup_logging(verbose, quiet)
    values = merge_config(ctx, flags, config_file)
    source, body, broker = _split_config(values)
    if not 0 <= values["index"] < values["workers"]:
        raise click.UsageError("--index must be in [0, --of)")
    cfg = WorkerConfig(
        source=source,
        broker=broker,
        body=body,
        index=values["index"],
        workers=values["workers"],
        max_batch=values["max_batch"],
        max_wait_ms=values["max_wait_ms"],
    )
    try:
        run_worker(cfg)
    except (BundleError, TransportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("broker-config")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New (or empty) folder to write into; nothing is ever overwritten.",
)
@click.option(
    "--devices",
    "devices",
    multiple=True,
    metavar="ID...",
    help="Device ids (MQTT user names). `--devices a b c`, `--devices a,b` or repeated.",
)
@click.argument("more_devices", nargs=-1, metavar="")
@click.option("--server-user", default="server", show_default=True, help="The server's user name.")
@click.option(
    "--workers", default=0, show_default=True, help="Users SERVER-USER-worker-I for body workers."
)
@click.option("--port", default=8883, show_default=True, help="TLS listener port.")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    help="DNS name or IP clients use to reach the broker (repeatable); goes into its "
    "certificate. Default: localhost and 127.0.0.1.",
)
@click.option(
    "--install-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the folder will live on the broker host, if not where it is written "
    "(mosquitto.conf names files by absolute path).",
)
@click.option(
    "--run-as",
    help="Account mosquitto switches to when started as root; it gets the files the broker "
    "reads and writes. Default: mosquitto when run as root, else you (only root can name another).",
)
@click.option(
    "--max-packet-size",
    default=16 << 20,
    show_default=True,
    help="Largest MQTT packet in bytes; clients split bigger payloads into chunks.",
)
@click.option("--days", default=825, show_default=True, help="Certificate validity in days.")
@click.option(
    "--access",
    type=click.Choice(["dynsec", "acl-file"]),
    default="dynsec",
    show_default=True,
    help="dynsec: Mosquitto's dynamic-security plugin, which refuses a SUBSCRIBE to another "
    "device's topics and can add devices while running. acl-file: password_file + acl_file, "
    "for a Mosquitto without the plugin (it grants such a SUBSCRIBE but delivers nothing).",
)
@click.option(
    "--add",
    is_flag=True,
    help="Add --devices to the set-up already in --out: certificates and passwords, and their "
    "rules (dynsec: live, through mosquitto_ctrl as admin on the running broker at "
    "--broker-host; acl-file: in passwd, then send mosquitto SIGHUP).",
)
@click.option("--broker-host", default="localhost", show_default=True, help="With --add.")
@click.option(
    "--dynsec-plugin",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Path of mosquitto_dynamic_security.so on the broker host. Default: found here.",
)
def broker_config(
    out: Path,
    devices: tuple[str, ...],
    more_devices: tuple[str, ...],
    server_user: str,
    workers: int,
    port: int,
    bind: str,
    hostnames: tuple[str, ...],
    install_dir: Path | None,
    run_as: str | None,
    max_packet_size: int,
    days: int,
    access: str,
    add: bool,
    broker_host: str,
    dynsec_plugin: Path | None,
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
    """
    from .broker_config import BrokerConfigOptions, write_broker_config

    ids = tuple(d for item in (*devices, *more_devices) for d in item.split(",") if d)
    if add:
        _add_devices(out, ids, broker_host, days)
        return
    options = BrokerConfigOptions(
        out=out,
        devices=ids,
        server_user=server_user,
        workers=workers,
        port=port,
        bind=bind,
        hostnames=hostnames or ("localhost", "127.0.0.1"),
        install_dir=install_dir,
        run_as=run_as,
        max_packet_size=max_packet_size,
        days=days,
        access=access,
        dynsec_plugin=dynsec_plugin,
    )
    try:
        files = write_broker_config(options)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Wrote {files.config} for {len(ids)} device(s) and user {server_user!r}.")
    click.echo(f"Start it with: mosquitto -c {files.config}")
    click.echo(f"Give each device its folder under {out / 'clients'} (keep certs/ca.key private).")


def _add_devices(out: Path, ids: tuple[str, ...], broker_host: str, days: int) -> None:
    from .broker_config import AddDevicesOptions, add_devices

    if not ids:
        raise click.UsageError("--add needs --devices ID...")
    try:
        done = add_devices(AddDevicesOptions(out, ids, broker_host, days))
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        raise click.ClickException(str(exc)) from exc
    for line in done:
        click.echo(f"Added {line}.")
    click.echo(f"Give each new device its folder under {out / 'clients'}.")
