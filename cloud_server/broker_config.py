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

Each device may publish only under its own up-tree and presence, and read only its own down-tree,
the broadcasts and the server status; the server may use everything (`broker_access`).
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

Who owns what: `mosquitto -c mosquitto.conf` started as root reads the config, then switches to
the account in its `user` line before it opens the server key, the access rules and data/. So
that account owns those files (mode 0600, data/ 0700), and the folder itself, in which the
dynamic-security plugin saves its JSON (it writes a new file and renames it over the old one).
Run as root, broker-config hands them to `--run-as` (default `mosquitto`); run as anyone else,
it writes `user <you>`, so a broker started as root runs as the files' owner. The CA key and
clients/ stay private to whoever ran broker-config: the broker never needs them.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.protocol.messages import check_device_id
from sfprompt.protocol.topics import Topics

from . import broker_access as access
from .broker_certs import cert_pem, key_pem, load_ca, make_ca, make_leaf, write_pem


@dataclass(frozen=True)
class BrokerConfigOptions:
    out: Path
    devices: tuple[str, ...]
    server_user: str = "server"  # the user name (and client id) of the cloud server
    port: int = 8883
    bind: str = "0.0.0.0"
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")  # names/IPs in the broker cert
    install_dir: Path | None = None  # where the folder will live on the broker host
    run_as: str | None = None  # mosquitto's `user`, the account it drops root to (broker_account)
    max_packet_size: int = 16 << 20  # clients chunk payloads to fit under it
    days: int = 825
    topics: Topics = field(default_factory=Topics)
    access: str = "dynsec"  # or "acl-file" (see broker_access)
    dynsec_plugin: Path | None = None  # the plugin's path on the broker host; found if None
    identity: str = "certificate"  # or "password": who a client is (module docstring)
    workers: int = 0  # users for `sfprompt-cloud worker`s: <server_user>-worker-<i>


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
    users = _check_users(options)
    plugin = _plugin_path(options)
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    account = broker_account(options)
    if account.uid is not None and options.install_dir is None:
        _check_reachable(account, out)
    _make_folders(out)
    home = (options.install_dir or out).resolve()
    passwords = _write_certificates(options, users)
    servers = [options.server_user, *access.worker_users(options.server_user, options.workers)]
    if plugin is not None:
        written, access_lines = _write_dynsec(options, home, plugin, passwords, servers)
    else:
        written, access_lines = _write_password_and_acl(options, home, passwords, servers, use_tool)
    config_path = out / "mosquitto.conf"
    config_path.write_text(_config_text(options, home, account, access_lines))
    if account.uid is not None:
        _hand_over(out, account, options.access)
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


# ---- who owns what ---------------------------------------------------------------------------
DEFAULT_RUN_AS = "mosquitto"  # mosquitto's own default, and the account its Debian package makes


@dataclass(frozen=True)
class BrokerAccount:
    """The account mosquitto runs as once started as root (the conf's `user`); uid and gid are
    set when this run hands the broker's files to it (only root can, and only to an account
    that exists here)."""

    name: str
    uid: int | None = None
    gid: int | None = None


def broker_account(options: BrokerConfigOptions) -> BrokerAccount:
    """`--run-as`, or by default `mosquitto` when run as root (or for another host,
    `--install-dir`), else the user running this, who then owns every file. Raises ValueError
    where the broker could not read its files: no such account here, or another account named
    by a user who cannot give files away."""
    root = os.geteuid() == 0
    me = "root" if root else _my_name()
    name = options.run_as or (DEFAULT_RUN_AS if root or options.install_dir else me)
    entry = _account(name)
    if entry is None and options.install_dir is None:
        raise ValueError(
            f"there is no account {name!r} here for mosquitto to run as: give --run-as USER "
            "(installing mosquitto, e.g. `apt-get install mosquitto`, makes the account "
            f"{DEFAULT_RUN_AS!r}), or --install-dir if the folder goes to another host"
        )
    if not root and name != me and options.install_dir is None:
        raise ValueError(_only_root_message(name, me, options))
    if not root or entry is None or entry.pw_uid == 0:
        return BrokerAccount(name)
    return BrokerAccount(name, entry.pw_uid, entry.pw_gid)


def _only_root_message(name: str, me: str, options: BrokerConfigOptions) -> str:
    """How to get a broker running as `name` when a normal user writes the files."""
    chown = _chown_command(name, options.out.resolve(), options.access)
    return (
        f"--run-as {name}: only root can give the broker's files to another account. Run "
        f"broker-config as root (sudo), or leave out --run-as: mosquitto started as root then "
        f"runs as you ({me}), who own the files. Or write them as you and then, as root, run "
        f"`{chown}` and change the line `user {me}` in mosquitto.conf to `user {name}`."
    )


def _my_name() -> str:
    entry = _account(os.geteuid())
    if entry is None:
        raise ValueError(f"user id {os.geteuid()} has no account name for mosquitto's `user`")
    return entry.pw_name


def _account(who: str | int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(who) if isinstance(who, int) else pwd.getpwnam(who)
    except KeyError:
        return None


def _broker_owned(home: Path, access_mode: str) -> list[Path]:
    """What the broker, after dropping root, reads or writes: the folder (the dynsec plugin
    saves its JSON there through a new file), data/ (persistence), its key and access rules."""
    rules = ["dynamic-security.json"] if access_mode == "dynsec" else ["passwd", "acl"]
    return [home, home / "data", home / "certs" / "server.key", *(home / name for name in rules)]


def _chown_command(name: str, home: Path, access_mode: str) -> str:
    return " ".join(["chown", f"{name}:", *map(str, _broker_owned(home, access_mode))])


def _hand_over(out: Path, account: BrokerAccount, access_mode: str) -> None:
    """Give the broker's files to its account (their modes stay private: 0600, 0700)."""
    assert account.uid is not None and account.gid is not None
    for path in _broker_owned(out, access_mode):
        os.chown(path, account.uid, account.gid)


def _check_reachable(account: BrokerAccount, out: Path) -> None:
    """mosquitto opens its files by absolute path after dropping root, so every folder above
    them must let its account through: a 0700 home folder or pytest's temporary folders do
    not. Checked before anything is written."""
    assert account.uid is not None and account.gid is not None
    groups = set(os.getgrouplist(account.name, account.gid))
    for parent in out.resolve().parents:
        if parent.exists() and not _may_enter(parent.stat(), account.uid, groups):
            raise ValueError(
                f"mosquitto, running as {account.name}, could not reach {out.resolve()}: "
                f"{parent} is closed to it (mode {parent.stat().st_mode & 0o777:o}). Write the "
                f"folder where it can (e.g. /etc/mosquitto/sfprompt), or open the way: "
                f"chmod o+x {parent}"
            )


def _may_enter(info: os.stat_result, uid: int, groups: set[int]) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & 0o100)
    if info.st_gid in groups:
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def _write_dynsec(
    options: BrokerConfigOptions,
    home: Path,
    plugin: Path,
    passwords: dict[str, str],
    servers: list[str],
) -> tuple[tuple[Path, ...], list[str]]:
    """dynamic-security.json, and the mosquitto.conf lines that load it."""
    path = options.out / "dynamic-security.json"
    devices = list(options.devices)
    config = access.dynsec_config(options.topics, servers, devices, passwords)
    access.write_dynsec_config(path, config)
    return (path,), [f"plugin {plugin}", f"plugin_opt_config_file {home / path.name}"]


def _write_password_and_acl(
    options: BrokerConfigOptions,
    home: Path,
    passwords: dict[str, str],
    servers: list[str],
    use_tool: bool,
) -> tuple[tuple[Path, ...], list[str]]:
    """passwd and acl, and the mosquitto.conf lines that name them."""
    passwd, acl = options.out / "passwd", options.out / "acl"
    access.write_password_file(passwd, passwords, use_tool)
    access.write_acl_file(acl, options.topics, servers)
    return (passwd, acl), [f"password_file {home / 'passwd'}", f"acl_file {home / 'acl'}"]


def _check_users(options: BrokerConfigOptions) -> list[str]:
    """Server and its workers first, then the devices, then (dynsec) the admin."""
    if not options.devices:
        raise ValueError("give at least one device id (--devices ID...)")
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
    return [options.server_user, *workers, *devices, *reserved[1 + len(workers) :]]


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


def _write_certificates(options: BrokerConfigOptions, users: list[str]) -> dict[str, str]:
    """CA, broker and client certificates, and a fresh password per user (returned)."""
    out = options.out
    ca_key, ca_cert = make_ca(options.days)
    write_pem(out / "certs" / "ca.key", key_pem(ca_key), private=True)
    write_pem(out / "certs" / "ca.crt", cert_pem(ca_cert))
    server_key, server_cert = make_leaf(
        "sfprompt-broker", ca_key, ca_cert, options.days, server=True, names=options.hostnames
    )
    write_pem(out / "certs" / "server.key", key_pem(server_key), private=True)
    write_pem(out / "certs" / "server.crt", cert_pem(server_cert))
    return {user: _write_client(out, user, ca_key, ca_cert, options.days) for user in users}


def _write_client(out: Path, user: str, ca_key: Any, ca_cert: Any, days: int) -> str:
    """clients/<user>/ (0700, the writer's: it is for another machine, not the broker):
    certificate, key, the CA certificate and a fresh password (returned)."""
    folder = out / "clients" / user
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    key, cert = make_leaf(user, ca_key, ca_cert, days, server=False, names=())
    write_pem(folder / "client.key", key_pem(key), private=True)
    write_pem(folder / "client.crt", cert_pem(cert))
    shutil.copyfile(out / "certs" / "ca.crt", folder / "ca.crt")
    password = secrets.token_urlsafe(24)
    write_pem(folder / "password", password.encode() + b"\n", private=True)
    return password


# ---- more devices later ----------------------------------------------------------------------
@dataclass(frozen=True)
class AddDevicesOptions:
    folder: Path  # what write_broker_config wrote
    devices: tuple[str, ...]
    broker_host: str = "localhost"  # dynsec: where the running broker is reached
    days: int = 825
    topics: Topics = field(default_factory=Topics)


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
        password = _write_client(folder, device, ca_key, ca_cert, options.days)
        if dynsec:
            for command in access.dynsec_add_commands(options.topics, device, password):
                _run_ctrl(ctrl, command, repr(device))
            done.append(f"{device}: certificate, password and role device-{device} (live)")
        else:
            access.write_password_file(folder / "passwd", {device: password}, use_tool)
            done.append(f"{device}: certificate and password (send mosquitto SIGHUP to reload)")
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
        f"#   {_chown_command(account.name, home, options.access)}",
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
