"""A site broker in front of a central one: a Mosquitto bridge for the site's devices.

Devices at a site connect to a Mosquitto there; its bridge (one MQTT v5 connection, user
SITE, to the central broker where the server runs) carries exactly the site devices' topics,
each in the direction the protocol sends it. One table decides: a device's access rules
(`Topics.device_access`). What a device may publish starts at the site and goes out to the
central broker; what it may only read starts there and comes in:

    sfp/v1/dev/<id>/up/#      out    device -> server
    sfp/v1/dev/<id>/down/#    in     server -> device
    sfp/v1/presence/<id>      out    retained, and its Last Will: published at the site only
    sfp/v1/server/status      in     retained; once per bridge

No topic goes both ways: only the device publishes its presence, and with `both` the central
broker's retained copy would come back on every reconnect and overwrite a newer Last Will at
the site (which the next reconnect would then send out again). Nothing else crosses: not other
devices' topics, not topics outside the tree. On the central broker (`--site SITE=ID,...`) the
bridge's user may use the same rules for those devices and nothing else, so a site broker that
is taken over can speak only for its own devices.

MQTT v5 is required: requests carry a response topic and correlation data, which a v3.1.1
bridge would drop. Mosquitto 2.0's v5 bridge sends no Session Expiry Interval, so the central
broker ends the bridge's session when the link drops (docs/broker.md, "Beyond one node").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.options import opt
from sfprompt.protocol.messages import check_device_id
from sfprompt.protocol.topics import Topics

from . import broker_access as access
from .broker_account import BrokerAccount

DIRECTIONS = {"write": "out", "readwrite": "out", "read": "in"}  # device's rule -> bridge way
BRIDGE_QOS = 1  # the protocol's QoS
CREDENTIALS = ("ca.crt", "client.crt", "client.key", "password")
Sites = dict[str, tuple[str, ...]]  # site user -> its device ids


@dataclass(frozen=True)
class BridgeOptions:
    """`broker-config` for brokers beyond one node: a central one (`sites`) or a site broker
    (`bridge_to`, `bridge_credentials`)."""

    sites: tuple[str, ...] = field(
        default=(),
        metadata=opt(
            "Central broker: a site broker that bridges here gets user NAME, allowed the topics "
            "of devices ID,... only (repeatable). Give clients/NAME/ to that site.",
            flag="--site",
            metavar="NAME=ID,...",
        ),
    )
    bridge_to: tuple[str, ...] = field(
        default=(),
        metadata=opt(
            "Site broker: bridge the --devices' topics to the central broker at HOST:PORT (a "
            "name in its certificate); repeat for fallback addresses.",
            metavar="HOST:PORT",
        ),
    )
    bridge_credentials: Path | None = field(
        default=None,
        metadata=opt(
            "Site broker: the central broker's clients/NAME/ folder for this site (ca.crt, "
            "client.crt, client.key, password); NAME is the bridge's user.",
            file_okay=False,
        ),
    )


def check_bridging(options: BridgeOptions, users: Sequence[str], devices: Sequence[str]) -> Sites:
    """The sites, checked; raises ValueError naming the problem before anything is written:
    a bad NAME=ID,... or address, a name already a user, a device in two places, missing
    credentials, or one broker both central and site (one level of bridging)."""
    sites = parse_sites(options.sites)
    if sites and options.bridge_to:
        raise ValueError("--site and --bridge-to together: a broker is central or a site, not both")
    taken = {name for name in sites if name in users}
    if taken:
        raise ValueError(f"site name(s) {sorted(taken)} are already user names of this broker")
    homes: dict[str, str] = {}
    for name, site_devices in sites.items():
        for device in site_devices:
            if device in devices or device in homes:
                where = f"site {homes[device]!r}" if device in homes else "this broker"
                raise ValueError(
                    f"device {device!r} is in site {name!r} and in {where}: a device connects "
                    "to one broker"
                )
            homes[device] = name
    if options.bridge_to:
        for address in options.bridge_to:
            parse_address(address)
        bridge_user(options)
    elif options.bridge_credentials is not None:
        raise ValueError("--bridge-credentials without --bridge-to HOST:PORT")
    return sites


def parse_sites(entries: Sequence[str]) -> Sites:
    sites: Sites = {}
    for entry in entries:
        name, sep, ids = entry.partition("=")
        devices = tuple(d.strip() for d in ids.split(",") if d.strip())
        if not sep or not devices:
            raise ValueError(f"--site {entry!r}: expected NAME=ID,... (the site's device ids)")
        check_device_id(name, "site name")
        for device in devices:
            check_device_id(device, f"device id of site {name!r}")
        if name in sites or len(set(devices)) != len(devices):
            raise ValueError(f"--site {entry!r}: a site name or a device id given twice")
        sites[name] = devices
    return sites


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT)."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--bridge-to {address!r}: expected HOST:PORT, e.g. mqtt.example.org:8883")
    return host, int(port)


def bridge_user(options: BridgeOptions) -> str:
    """The bridge's user on the central broker: the credentials folder's name."""
    folder = options.bridge_credentials
    if folder is None:
        raise ValueError(
            "--bridge-to needs --bridge-credentials: the central broker's clients/NAME/ folder, "
            "written there by `broker-config --site NAME=ID,...`"
        )
    missing = [name for name in CREDENTIALS if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"--bridge-credentials {folder} lacks {', '.join(missing)}")
    return check_device_id(folder.resolve().name, "bridge user (credentials folder name)")


# ---- central broker: the sites' access rules -------------------------------------------------
def site_access(topics: Topics, devices: Sequence[str]) -> list[tuple[str, str]]:
    """What a site's bridge may do: its devices' rules, each topic once."""
    rules: dict[str, str] = {}
    for device in devices:
        for mode, topic in topics.device_access(device):
            rules.setdefault(topic, mode)
    return [(mode, topic) for topic, mode in rules.items()]


def add_dynsec_sites(
    config: dict[str, Any], topics: Topics, sites: Sites, passwords: dict[str, str]
) -> None:
    """Into `dynsec_config`'s JSON: a role `device-<id>` per site device (the rules a device of
    this broker would get) and a client per site holding its devices' roles, pinned to its
    user name as client id like every other."""
    for name, devices in sites.items():
        roles = [access.device_role(device) for device in devices]
        for device, role in zip(devices, roles):
            config["roles"].append(access._dynsec_role(role, topics.device_access(device)))
        client = access._dynsec_client(name, passwords[name], roles[0])
        client["roles"] = [{"rolename": role} for role in roles]
        config["clients"].append(client)


def site_acl_text(topics: Topics, sites: Sites) -> str:
    """acl_file lines for the sites' bridges (after the server's: `user` opens a block)."""
    lines = ["", "# Site brokers' bridges: each may use its own devices' topics only."]
    for name, devices in sites.items():
        lines.append(f"user {name}")
        lines.extend(f"topic {mode} {topic}" for mode, topic in site_access(topics, devices))
    return "\n".join(lines) + "\n"


# ---- site broker: the bridge -----------------------------------------------------------------
def bridge_topics(topics: Topics, devices: Sequence[str]) -> list[tuple[str, str]]:
    """(topic filter, direction) the bridge carries: each device rule's topic, out if the
    device may publish there, in if it may only read (module docstring)."""
    return [(topic, DIRECTIONS[mode]) for mode, topic in site_access(topics, devices)]


def write_bridge(
    options: BridgeOptions,
    out: Path,
    home: Path,
    devices: Sequence[str],
    topics: Topics,
    max_packet_size: int,
) -> list[str]:
    """Copy the bridge's credentials into out/bridge/ and return the `connection` block."""
    assert options.bridge_credentials is not None
    user = bridge_user(options)
    folder = out / "bridge"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    for name in CREDENTIALS[:3]:
        shutil.copyfile(options.bridge_credentials / name, folder / name)
        (folder / name).chmod(0o600 if name.endswith(".key") else 0o644)
    password = (options.bridge_credentials / "password").read_text().strip()
    addresses = " ".join(options.bridge_to)
    return [
        "",
        f"# Bridge to the central broker as user {user}: the topics of this site's devices only.",
        f"connection {user}",
        f"address {addresses}",
        "round_robin false",  # the first address is the main one, the others fallbacks
        "bridge_protocol_version mqttv50",  # response topics and correlation data cross
        f"remote_clientid {user}",  # the central broker pins each user to its name
        f"remote_username {user}",
        f"remote_password {password}",
        f"bridge_cafile {home / 'bridge' / 'ca.crt'}",
        f"bridge_certfile {home / 'bridge' / 'client.crt'}",
        f"bridge_keyfile {home / 'bridge' / 'client.key'}",
        "bridge_insecure false",
        "bridge_tls_version tlsv1.2",
        "start_type automatic",
        "restart_timeout 2 30",  # jittered backoff: 2 s at first, at most 30 s
        "keepalive_interval 30",
        "cleansession false",  # the site queues device traffic while the link is down
        "try_private true",  # for v3 bridges; a v5 one subscribes with No Local (no loops)
        "notifications true",
        "notifications_local_only true",  # $SYS/broker/connection/<user>/state, here only
        f"bridge_max_packet_size {max_packet_size}",
        *(
            f"topic {topic} {direction} {BRIDGE_QOS}"
            for topic, direction in bridge_topics(topics, devices)
        ),
    ]


def bridge_owned(home: Path) -> list[Path]:
    """What a site broker, after dropping root, reads besides broker_account's list: the
    bridge key (at each connect), and mosquitto.conf, private for the bridge password (SIGHUP
    rereads it)."""
    return [home / "mosquitto.conf", home / "bridge" / "client.key"]


def chown_comment(account: str, home: Path) -> list[str]:
    """mosquitto.conf comment lines: what else to give the broker's account after a copy."""
    return [
        "# A site broker: after copying, also give it this conf (it holds the bridge password)",
        f"# and the bridge key: chown {account}: {' '.join(map(str, bridge_owned(home)))}",
    ]


def hand_over_bridge(out: Path, account: BrokerAccount) -> None:
    """mosquitto.conf made 0600 (it holds the bridge password); it and the bridge key go to
    the broker's account when this run may give files away (as `broker_account.hand_over`)."""
    (out / "mosquitto.conf").chmod(0o600)
    if account.uid is not None and account.gid is not None:
        for path in bridge_owned(out):
            os.chown(path, account.uid, account.gid)


def is_site(folder: Path) -> bool:
    return _site_user(folder / "mosquitto.conf") is not None


def _site_user(config: Path) -> str | None:
    """The bridge's user: the name of the (last) `connection` block, None if there is none."""
    names = [line.split()[1] for line in _lines(config) if line.startswith("connection ")]
    return names[-1] if names else None


def _lines(config: Path) -> list[str]:
    return config.read_text().splitlines() if config.is_file() else []


def add_site_devices(folder: Path, devices: Sequence[str], topics: Topics) -> str:
    """`broker-config --add` on a site broker: the new devices' topics appended to its bridge
    (the last block of mosquitto.conf). Says what else to do: restart this broker (Mosquitto
    reads bridge topics at start only), and give the site's user on the central broker the
    devices' rules (`mosquitto_ctrl dynsec` commands, or acl_file lines)."""
    config = folder / "mosquitto.conf"
    user = _site_user(config)
    assert user is not None
    have = set(_lines(config))
    new = [f"topic {t} {way} {BRIDGE_QOS}" for t, way in bridge_topics(topics, devices)]
    with config.open("a") as handle:  # keeps its owner and mode 0600
        handle.writelines(line + "\n" for line in new if line not in have)
    dynsec = [
        " ".join(["    mosquitto_ctrl <admin options> dynsec", *command])
        for device in devices
        for command in _central_commands(topics, user, device)
    ]
    acl = [f"    topic {mode} {topic}" for mode, topic in site_access(topics, devices)]
    return "\n".join(
        [
            f"{', '.join(devices)} to the bridge. Restart this broker, and on the central broker",
            f"give user {user} their rules. With dynsec:",
            *dynsec,
            f"  With acl-file, append to its acl file:\n    user {user}",
            *acl,
            "  and send it SIGHUP",
        ]
    )


def _central_commands(topics: Topics, site: str, device: str) -> list[list[str]]:
    """`dynsec_add_commands` for a device behind a site: its role, held by the site's user
    (the device itself has no user on the central broker)."""
    role = access.device_role(device)
    commands = [c[1:] for c in access.dynsec_add_commands(topics, device, "unused")]
    kept = [c for c in commands if c[0] not in ("createClient", "addClientRole")]
    return [*kept, ["addClientRole", site, role]]
