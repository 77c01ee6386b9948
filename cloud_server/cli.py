"""`sfprompt-cloud`: the server's command line (a click group; each command calls one function).

Commands are added with `@main.command(...)`; `serve` and `worker` join `broker-config` here.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """sfprompt cloud side: the broker set-up, and (soon) the training server and workers."""


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
@click.option("--run-as", help="Account mosquitto switches to when started as root.")
@click.option(
    "--max-packet-size",
    default=16 << 20,
    show_default=True,
    help="Largest MQTT packet in bytes; clients split bigger payloads into chunks.",
)
@click.option("--days", default=825, show_default=True, help="Certificate validity in days.")
def broker_config(
    out: Path,
    devices: tuple[str, ...],
    more_devices: tuple[str, ...],
    server_user: str,
    port: int,
    bind: str,
    hostnames: tuple[str, ...],
    install_dir: Path | None,
    run_as: str | None,
    max_packet_size: int,
    days: int,
) -> None:
    """Write a production Mosquitto config for a fleet of devices.

    \b
    It writes, under OUT:
      mosquitto.conf   TLS listener, no anonymous access, persistence
      acl              each device may use only its own topics; the server all
      passwd           hashed passwords (mosquitto 2 format)
      certs/           CA, and the broker's certificate and key
      clients/ID/      per device (and server): ca.crt, client.crt, client.key,
                       password -- copy that folder to the device
    Then run: mosquitto -c OUT/mosquitto.conf

    \b
    Example:
      sfprompt-cloud broker-config --out ./broker --hostname mqtt.example.org \\
          --devices cam-01 cam-02 cam-03
    """
    from .broker_config import BrokerConfigOptions, write_broker_config

    ids = tuple(d for item in (*devices, *more_devices) for d in item.split(",") if d)
    options = BrokerConfigOptions(
        out=out,
        devices=ids,
        server_user=server_user,
        port=port,
        bind=bind,
        hostnames=hostnames or ("localhost", "127.0.0.1"),
        install_dir=install_dir,
        run_as=run_as,
        max_packet_size=max_packet_size,
        days=days,
    )
    try:
        files = write_broker_config(options)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Wrote {files.config} for {len(ids)} device(s) and user {server_user!r}.")
    click.echo(f"Start it with: mosquitto -c {files.config}")
    click.echo(f"Give each device its folder under {out / 'clients'} (keep certs/ca.key private).")
