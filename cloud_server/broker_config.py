"""Write a production Mosquitto configuration: TLS, passwords, and access rules per device.

What it writes under the output folder:

    mosquitto.conf          one TLS listener, no anonymous access, persistence on
    dynamic-security.json   (--access dynsec, the default) users, password hashes and one role
                            per device, for Mosquitto's dynamic-security plugin, which refuses
                            a SUBSCRIBE to another device's topics (SUBACK 0x87)
    passwd, acl             (--access acl-file) mosquitto's password_file and acl_file instead
    certs/ca.crt, ca.key    the CA that signs everything (keep ca.key private; --add uses it)
    certs/server.crt, .key  the broker's certificate, for the given host names and IPs
    clients/<id>/           per user (each device, the server, and with dynsec the admin):
                            ca.crt, client.crt, client.key, password -- copy it to that machine
    bridge/                 (--bridge-to: a site broker) the central broker's CA, the bridge's
                            certificate and key, for the `connection` block (`broker_bridge`)

Each device may publish only under its own up-tree and presence, and read only its own down-tree
and the server status; the server may use everything (`broker_access`).
`cryptography` comes with the `cloud` extra; the CLI imports this module only when the command
runs. Keys are written mode 0600.

Who a client is (`identity`). Mosquitto 2.0 cannot check a certificate and a password together:
with `use_identity_as_username` it takes the user name from the certificate's CN and discards the
password unchecked (and skips the plugin's password check, with its client-id pin); without it,
any certificate the CA signed passes the TLS handshake and the password alone names the user.
- "certificate" (default): the certificate's CN is the user and, with `use_username_as_clientid`,
  the client id too. A certificate works only for its own user and no client can take over
  another's session; the password files are still written (and hashed in the access files) but
  Mosquitto does not check them.
- "password": a CA-signed certificate (any of the fleet's) plus the user's password; the
  dynamic-security plugin refuses a client id other than the user's own (CONNACK 0x87).
Body workers (`workers`) get users of their own (`server-worker-<i>`): one user is one client id.

Who owns what (which account the broker runs as, and the files it must own) is
`broker_account`'s. Beyond one broker (`--site` on a central one, `--bridge-to` on a site
broker in front of it): `broker_bridge`.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sfprompt.options import internal, opt
from sfprompt.protocol.messages import check_device_id
from sfprompt.protocol.topics import Topics

from . import broker_access as access
from . import broker_bridge as bridge
from .broker_account import (
    BrokerAccount,
    broker_account,
    check_reachable,
    chown_command,
    hand_over,
)
from .broker_bridge import BridgeOptions
from .broker_certs import load_ca, write_certificates, write_client


@dataclass(frozen=True)
class BrokerConfigOptions:
    """Everything `sfprompt-cloud broker-config` takes to write a set-up."""

    out: Path = field(
        metadata=opt(
            "New (or empty) folder to write into; nothing is ever overwritten.", file_okay=False
        )
    )
    devices: tuple[str, ...] = field(
        metadata=opt(
            "Device ids (MQTT user names). `--devices a b c`, `--devices a,b` or repeated.",
            metavar="ID...",
        )
    )
    server_user: str = field(default="server", metadata=opt("The server's user name."))
    port: int = field(default=8883, metadata=opt("TLS listener port."))
    bind: str = field(default="0.0.0.0", metadata=opt("Address to listen on."))
    hostnames: tuple[str, ...] = field(
        default=("localhost", "127.0.0.1"),
        metadata=opt(
            "DNS name or IP clients use to reach the broker (repeatable); goes into its "
            "certificate.",
            flag="--hostname",
        ),
    )
    install_dir: Path | None = field(
        default=None,
        metadata=opt(
            "Where the folder will live on the broker host, if not where it is written "
            "(mosquitto.conf names files by absolute path).",
            file_okay=False,
        ),
    )
    run_as: str | None = field(  # mosquitto's `user` (broker_account)
        default=None,
        metadata=opt(
            "Account mosquitto switches to when started as root; it gets the files the broker "
            "reads and writes. Default: mosquitto when run as root, else you (only root can "
            "name another)."
        ),
    )
    max_packet_size: int = field(
        default=16 << 20,
        metadata=opt("Largest MQTT packet in bytes; clients split bigger payloads into chunks."),
    )
    days: int = field(default=825, metadata=opt("Certificate validity in days."))
    topics: Topics = field(default_factory=Topics, metadata=internal())
    access: str = field(
        default="dynsec",
        metadata=opt(
            "dynsec: Mosquitto's dynamic-security plugin, which refuses a SUBSCRIBE to another "
            "device's topics and can add devices while running. acl-file: password_file + "
            "acl_file, for a Mosquitto without the plugin (it grants such a SUBSCRIBE but "
            "delivers nothing).",
            choices=access.ACCESS_MODES,
        ),
    )
    dynsec_plugin: Path | None = field(
        default=None,
        metadata=opt(
            "Path of mosquitto_dynamic_security.so on the broker host. Default: found here.",
            dir_okay=False,
        ),
    )
    # "certificate" or "password": who a client is (module docstring)
    identity: str = field(default="certificate", metadata=internal())
    workers: int = field(default=0, metadata=opt("Users SERVER-USER-worker-I for body workers."))
    bridging: BridgeOptions = field(default_factory=BridgeOptions)  # --site, --bridge-to


IDENTITIES = ("certificate", "password")


@dataclass(frozen=True)
class BrokerConfigFiles:
    config: Path
    access: tuple[Path, ...]  # dynamic-security.json, or passwd and acl
    ca_cert: Path
    client_dirs: dict[str, Path]  # user -> folder with ca.crt, client.crt, client.key, password


def write_broker_config(options: BrokerConfigOptions, use_tool: bool = True) -> BrokerConfigFiles:
    """Generate every file; raises ValueError, before writing anything, for bad device ids, an
    existing non-empty folder, a dynamic-security plugin that cannot be found, or a broker
    account that could not use the files (see `broker_account`). `use_tool`: hash passwords
    for the password file with `mosquitto_passwd` where installed."""
    users, sites = _check_users(options)
    plugin = _plugin_path(options)
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    account = broker_account(options.run_as, options.install_dir, out, options.access)
    if account.uid is not None and options.install_dir is None:
        check_reachable(account, out)
    _make_folders(out)
    home = (options.install_dir or out).resolve()
    passwords = write_certificates(out, users, options.days, options.hostnames)
    servers = [options.server_user, *access.worker_users(options.server_user, options.workers)]
    if plugin is not None:
        written, access_lines = _write_dynsec(options, home, plugin, passwords, servers, sites)
    else:
        written, access_lines = _write_password_and_acl(
            options, home, passwords, servers, sites, use_tool
        )
    config_path = out / "mosquitto.conf"
    text = _config_text(options, home, account, access_lines)
    config_path.write_text("\n".join([text, *_bridge_lines(options, home, account)]))
    if account.uid is not None:
        hand_over(out, account, options.access)
    if options.bridging.bridge_to:
        bridge.hand_over_bridge(out, account)
    client_dirs = {user: out / "clients" / user for user in users}
    return BrokerConfigFiles(config_path, written, out / "certs" / "ca.crt", client_dirs)


def _make_folders(out: Path) -> None:
    """The folder and new parents 0755 (the broker's account must pass through them, whatever
    the umask), data/ and the folder 0700 (they go to that account), certs/ 0755 (it opens the
    server certificate and key there), clients/ 0700 (keys for other machines)."""
    for parent in reversed([*out.absolute().parents]):
        if not parent.exists():
            parent.mkdir()
            parent.chmod(0o755)
    for folder, mode in ((out, 0o700), (out / "certs", 0o755), (out / "data", 0o700)):
        folder.mkdir(exist_ok=folder == out)
        folder.chmod(mode)
    (out / "clients").mkdir(mode=0o700)


def _write_dynsec(
    options: BrokerConfigOptions,
    home: Path,
    plugin: Path,
    passwords: dict[str, str],
    servers: list[str],
    sites: bridge.Sites,
) -> tuple[tuple[Path, ...], list[str]]:
    """dynamic-security.json, and the mosquitto.conf lines that load it."""
    path = options.out / "dynamic-security.json"
    devices = list(options.devices)
    local = {user: pw for user, pw in passwords.items() if user not in sites}
    config = access.dynsec_config(options.topics, servers, devices, local)
    bridge.add_dynsec_sites(config, options.topics, sites, passwords)
    access.write_dynsec_config(path, config)
    return (path,), [f"plugin {plugin}", f"plugin_opt_config_file {home / path.name}"]


def _write_password_and_acl(
    options: BrokerConfigOptions,
    home: Path,
    passwords: dict[str, str],
    servers: list[str],
    sites: bridge.Sites,
    use_tool: bool,
) -> tuple[tuple[Path, ...], list[str]]:
    """passwd and acl, and the mosquitto.conf lines that name them."""
    passwd, acl = options.out / "passwd", options.out / "acl"
    access.write_password_file(passwd, passwords, use_tool)
    access.write_acl_file(acl, options.topics, servers)
    if sites:
        with acl.open("a") as handle:  # keeps its mode, 0600
            handle.write(bridge.site_acl_text(options.topics, sites))
    return (passwd, acl), [f"password_file {home / 'passwd'}", f"acl_file {home / 'acl'}"]


def _check_users(options: BrokerConfigOptions) -> tuple[list[str], bridge.Sites]:
    """Server and its workers first, then the devices, the sites, (dynsec) the admin."""
    if not options.devices and not options.bridging.sites:
        raise ValueError("give at least one device id (--devices ID...) or --site NAME=ID,...")
    if options.access not in access.ACCESS_MODES:
        raise ValueError(f"access must be one of {access.ACCESS_MODES}, not {options.access!r}")
    if options.identity not in IDENTITIES:
        raise ValueError(f"identity must be one of {IDENTITIES}, not {options.identity!r}")
    if not 0 <= options.workers <= 64:
        raise ValueError(f"workers must be in 0-64, not {options.workers}")
    devices = [check_device_id(d, "device id") for d in options.devices]
    check_device_id(options.server_user, "server user")
    workers = access.worker_users(options.server_user, options.workers)
    reserved = [options.server_user, *workers]
    if options.access == "dynsec":
        reserved.append(access.ADMIN_USER)
        if options.server_user == access.ADMIN_USER:
            raise ValueError(f"{access.ADMIN_USER!r} is reserved for the dynamic-security admin")
    for name in reserved:
        if name in devices:
            raise ValueError(
                f"device id {name!r} is reserved (the server's, a worker's or the admin's user)"
            )
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be distinct")
    sites = bridge.check_bridging(options.bridging, [*reserved, *devices], devices)
    users = [options.server_user, *workers, *devices, *sites, *reserved[1 + len(workers) :]]
    return users, sites


def _plugin_path(options: BrokerConfigOptions) -> Path | None:
    if options.access != "dynsec":
        return None
    plugin = options.dynsec_plugin or access.find_dynsec_plugin()
    if plugin is None:
        raise ValueError(
            "Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found: "
            "give its path on the broker host with --dynsec-plugin, or use --access acl-file"
        )
    return plugin


# ---- more devices later ----------------------------------------------------------------------
@dataclass(frozen=True)
class AddDevicesOptions:
    """`broker-config --add`: the --out, --devices and --days of the set-up, and this one."""

    folder: Path = field(metadata=internal())  # what write_broker_config wrote
    devices: tuple[str, ...] = field(metadata=internal())
    broker_host: str = field(  # dynsec: where the running broker is reached
        default="localhost", metadata=opt("With --add.")
    )
    days: int = field(default=825, metadata=internal())
    topics: Topics = field(default_factory=Topics, metadata=internal())


def add_devices(options: AddDevicesOptions, use_tool: bool = True) -> list[str]:
    """Certificates and passwords for more devices, and their access rules: with dynsec through
    `mosquitto_ctrl` on the running broker (the plugin owns its JSON file while it runs), with
    acl-file appended to `passwd` (the broker rereads it on SIGHUP; its owner is kept). New
    clients/ folders are the writer's, like the first ones. Returns what was done."""
    folder = options.folder
    if not (folder / "certs" / "ca.key").is_file() or not (folder / "mosquitto.conf").is_file():
        raise ValueError(f"{folder} holds no broker set-up (certs/ca.key, mosquitto.conf)")
    devices = [check_device_id(d, "device id") for d in options.devices]
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be distinct")
    for device in devices:
        if (folder / "clients" / device).exists():
            raise ValueError(f"{device!r} is already a user of {folder}")
    dynsec = (folder / "dynamic-security.json").is_file()
    ctrl = _mosquitto_ctrl_as_admin(folder, options.broker_host) if dynsec else []
    if dynsec:  # reach the broker before writing anything
        _run_ctrl(ctrl, ["dynsec", "getDefaultACLAccess"], "the broker")
    ca_key, ca_cert = load_ca(folder / "certs")
    done: list[str] = []
    for device in devices:
        password = write_client(folder, device, ca_key, ca_cert, options.days)
        if dynsec:
            for command in access.dynsec_add_commands(options.topics, device, password):
                _run_ctrl(ctrl, command, repr(device))
            done.append(f"{device}: certificate, password and role device-{device} (live)")
        else:
            access.write_password_file(folder / "passwd", {device: password}, use_tool)
            done.append(f"{device}: certificate and password (send mosquitto SIGHUP to reload)")
    if bridge.is_site(folder):
        done.append(bridge.add_site_devices(folder, devices, options.topics))
    return done


def _mosquitto_ctrl_as_admin(folder: Path, host: str) -> list[str]:
    tool = shutil.which("mosquitto_ctrl")
    if tool is None:
        raise ValueError("mosquitto_ctrl not found: install the mosquitto package here")
    admin = folder / "clients" / access.ADMIN_USER
    listener = next(
        line.split()
        for line in (folder / "mosquitto.conf").read_text().splitlines()
        if line.startswith("listener ")
    )
    return [
        tool,
        *("-h", host, "-p", listener[1], "--cafile", str(folder / "certs" / "ca.crt")),
        *("--cert", str(admin / "client.crt"), "--key", str(admin / "client.key")),
        *("-u", access.ADMIN_USER, "-P", (admin / "password").read_text().strip()),
        *("-i", access.ADMIN_USER),  # its pinned client id
    ]


def _run_ctrl(ctrl: list[str], command: list[str], what: str) -> None:
    result = subprocess.run([*ctrl, *command], capture_output=True, text=True, timeout=30)
    said = (result.stdout + result.stderr).strip() or "no output"
    if result.returncode != 0 or "error" in said.lower():
        raise ValueError(
            f"`mosquitto_ctrl {' '.join(command[:2])}` for {what} failed: {said} (is the broker "
            "running, and reachable at --broker-host? Any new clients/ folder was written "
            "before this: delete it to retry)"
        )


def _config_text(
    options: BrokerConfigOptions, home: Path, account: BrokerAccount, access_lines: list[str]
) -> str:
    lines = [
        "# Generated by sfprompt-cloud broker-config; run with: mosquitto -c mosquitto.conf",
        f"# Started as root, mosquitto switches to user {account.name}, which must own what it",
        "# reads and writes (done if broker-config ran as root here; after copying, run there):",
        f"#   {chown_command(account.name, home, options.access)}",
        f"user {account.name}",
        "per_listener_settings false",
        "allow_anonymous false",
        *access_lines,
        "persistence true",
        f"persistence_location {home / 'data'}/",
        "max_queued_messages 10000",
        f"max_packet_size {options.max_packet_size}",
        "",
        f"listener {options.port} {options.bind}",
        f"cafile {home / 'certs' / 'ca.crt'}",
        f"certfile {home / 'certs' / 'server.crt'}",
        f"keyfile {home / 'certs' / 'server.key'}",
        "require_certificate true",
        *_identity_lines(options.identity),
        "tls_version tlsv1.2",
    ]
    return "\n".join(lines) + "\n"


def _bridge_lines(options: BrokerConfigOptions, home: Path, account: BrokerAccount) -> list[str]:
    if not options.bridging.bridge_to:
        return []
    devices, size = options.devices, options.max_packet_size
    lines = bridge.write_bridge(options.bridging, options.out, home, devices, options.topics, size)
    return [*bridge.chown_comment(account.name, home), *lines, ""]


def _identity_lines(identity: str) -> list[str]:
    """mosquitto.conf lines for `identity` (see the module docstring for why not both)."""
    if identity == "certificate":
        return [
            "# The certificate's CN is the user name and the client id; Mosquitto 2.0 then",
            "# ignores the password (use_identity_as_username false: password identity).",
            "use_identity_as_username true",
            "use_username_as_clientid true",
        ]
    return [
        "# The password names the user; any certificate of this CA passes TLS.",
        "use_identity_as_username false",
    ]
