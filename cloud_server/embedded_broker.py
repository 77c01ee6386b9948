"""The Mosquitto that `sfprompt-cloud serve` starts when it is given no broker URL.

It admits only the server, its body workers and the devices it is told, each with its own
password kept in OUT/broker/clients/<user>/password, and confines each device to its own
topics (`broker_access.FleetAccess`). It listens where `--listen` says; without it, where it
listened the last time this OUT was served (so a restarted server comes back on the same
address and its devices reconnect by themselves), else on loopback at a free port.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sfprompt.protocol.broker import BrokerError, BrokerWatchdog, EmbeddedBroker, parse_listen
from sfprompt.protocol.messages import check_device_id

from . import broker_access

log = logging.getLogger(__name__)

SERVER_USER = "server"  # the server's user on its embedded broker (as broker-config's default)


@contextmanager
def embedded_broker(
    devices: tuple[str, ...] | str,
    listen: str | None,
    port: int | None,
    out: Path,
    workers: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, str]]:
    """Run the embedded broker for as long as the block; yields its URL and the password of
    `SERVER_USER`. Its public URL is logged and written to OUT/broker_url. A watchdog starts
    it again if it dies; if that keeps failing, `stop` is set and BrokerError raised on exit.
    Raises ValueError (`embedded_fleet`) before anything starts."""
    host, port = embedded_address(listen, port, out)
    folder = out / "broker"
    fleet = embedded_fleet(devices, folder / "clients", workers)
    broker = EmbeddedBroker(
        folder, port, persistence=True, host=host, die_with_parent=True, access=fleet.write
    )
    with broker:
        (folder / "listen").write_text(f"{host} {broker.port}\n")
        url = broker.public_url()
        (out / "broker_url").write_text(url + "\n")
        _announce(host, broker.port, url, folder / "clients", fleet)
        watchdog = BrokerWatchdog(broker, lambda _: stop.set() if stop else None).start()
        try:
            yield broker.url, fleet.passwords[SERVER_USER]
        finally:
            watchdog.stop()
    if watchdog.failure is not None:
        raise BrokerError(f"the embedded broker is gone: {watchdog.failure}")


def embedded_fleet(
    devices: tuple[str, ...] | str, clients: Path, workers: int
) -> broker_access.FleetAccess:
    """The users of the embedded broker and their passwords (kept in `clients`); raises
    ValueError without devices, or for a device id that is not valid or not free. An item
    of `devices` may list several ids, comma-separated."""
    items = (devices,) if isinstance(devices, str) else devices
    ids = tuple(d.strip() for item in items for d in str(item).split(",") if d.strip())
    if not ids:
        raise ValueError(
            "the embedded broker admits only the devices it is told: give their ids with "
            "--devices pi-1,pi-2 (each one's password is written to "
            f"{clients}/<id>/password), or use a broker of your own with --broker"
        )
    servers = (SERVER_USER, *broker_access.worker_users(SERVER_USER, workers))
    for device in ids:
        check_device_id(device, "device id")
    passwords = broker_access.fleet_passwords(clients, [*servers, *ids])
    return broker_access.FleetAccess(servers, ids, passwords)


def embedded_address(listen: str | None, port: int | None, out: Path) -> tuple[str, int | None]:
    """(host, port) for the embedded broker: --listen, --embedded-port, the last run's, or
    loopback at a free port."""
    if listen is not None:
        return parse_listen(listen)
    if port is not None:
        return "127.0.0.1", port
    previous = out / "broker" / "listen"
    if previous.exists():
        try:
            host, last_port = previous.read_text().split()
            return host, int(last_port)
        except ValueError:
            log.warning("ignoring %s: not 'HOST PORT'", previous)
    return "127.0.0.1", None


def _announce(
    host: str, port: int, url: str, clients: Path, fleet: broker_access.FleetAccess
) -> None:
    """Say where devices connect and where their passwords are (never the passwords)."""
    log.info("broker listening on %s:%d; devices connect with --broker %s", host, port, url)
    log.info(
        "it admits %s, each with --username ID --password-file (a copy of) %s/ID/password",
        ", ".join(fleet.devices),
        clients,
    )
    if len(fleet.servers) > 1:
        log.info(
            "body workers log in as %s with %s/<user>/password",
            ", ".join(fleet.servers[1:]),
            clients,
        )
    if host in ("127.0.0.1", "::1", "localhost"):
        log.info("loopback only: for devices on other machines serve with --listen 0.0.0.0:1883")
    else:
        log.warning(
            "the embedded broker has no TLS: passwords and traffic cross %s:%d in clear; for a "
            "deployment beyond a trusted network use `sfprompt-cloud broker-config`",
            host,
            port,
        )
