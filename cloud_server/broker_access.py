"""Who may log in to the broker and which topics each user may use, in the forms Mosquitto reads.

One set of rules (`Topics.device_access`, `Topics.server_access`), two renderings:

- `dynsec` (the default): one JSON file for Mosquitto's dynamic-security plugin, which ships with
  Mosquitto 2. It checks every SUBSCRIBE: a device asking for another device's topics, or for the
  whole tree, is refused with SUBACK 0x87 (Not authorized). Devices can be added while the broker
  runs, with `mosquitto_ctrl` as the `admin` user (docs/broker.md).
- `acl-file`: the classic `password_file` plus `acl_file`, for a Mosquitto without the plugin.
  Mosquitto 2.0's acl_file never checks SUBSCRIBE (it grants it and filters what is delivered), so
  there a device subscribing to another's topics is told yes and then receives nothing.

Passwords are stored as PBKDF2-SHA512 hashes with a random salt, as `mosquitto_passwd` and
`mosquitto_ctrl` write them. Every dynsec client is pinned to its user name as client id: the
plugin refuses a CONNECT with any other client id (CONNACK 0x87), so nobody can take over another
user's session (Mosquitto closes the older connection of a client id that connects again).

`embedded_access` renders the same rules for the server's embedded broker (no TLS: passwords
only), with the per-user passwords `fleet_passwords` keeps under the broker's folder.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sfprompt.protocol.messages import check_device_id
from sfprompt.protocol.topics import Topics

ACCESS_MODES = ("dynsec", "acl-file")
ADMIN_USER = "admin"  # dynsec only: may change the access rules at run time, nothing else
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's and mosquitto_ctrl's default
SALT_BYTES = 12
DYNSEC_CONTROL = "$CONTROL/dynamic-security/#"
_DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)


def device_role(device_id: str) -> str:
    return f"device-{device_id}"


def worker_users(server_user: str, workers: int) -> list[str]:
    """The user names of `sfprompt-cloud worker`s: one each, since a user is one client id."""
    return [f"{server_user}-worker-{i}" for i in range(workers)]


# ---- dynamic-security plugin -----------------------------------------------------------------
def find_dynsec_plugin() -> Path | None:
    """Where this machine's Mosquitto keeps its dynamic-security plugin, if anywhere."""
    for folder in _PLUGIN_DIRS:
        candidate = Path(folder) / _DYNSEC_PLUGIN
        if candidate.is_file():
            return candidate
    return None


def dynsec_config(
    topics: Topics, servers: Sequence[str], devices: list[str], passwords: dict[str, str]
) -> dict[str, Any]:
    """The plugin's JSON: one role per device, one for the server side (`servers`: the server's
    user, then its workers'), one for the admin if `passwords` has one; nothing is allowed
    unless a role allows it. Every client is pinned to its user name as client id."""
    server_role = servers[0]
    roles = [_dynsec_role(device_role(d), topics.device_access(d)) for d in devices]
    roles.append(_dynsec_role(server_role, topics.server_access()))
    role_of = {user: server_role for user in servers}
    if ADMIN_USER in passwords:
        roles.append(_dynsec_role(ADMIN_USER, [("readwrite", DYNSEC_CONTROL)]))
        role_of[ADMIN_USER] = ADMIN_USER
    role_of.update({d: device_role(d) for d in devices})
    return {
        "clients": [_dynsec_client(user, passwords[user], role_of[user]) for user in passwords],
        "groups": [],
        "roles": roles,
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def dynsec_add_commands(topics: Topics, device_id: str, password: str) -> list[list[str]]:
    """The `mosquitto_ctrl dynsec` commands that add one device to a running broker, with the
    same role `dynsec_config` would have written for it."""
    role = _dynsec_role(device_role(device_id), topics.device_access(device_id))
    commands = [
        ["createClient", device_id, "-p", password, "-c", device_id],
        ["createRole", role["rolename"]],
        *(
            ["addRoleACL", role["rolename"], acl["acltype"], acl["topic"], "allow"]
            for acl in role["acls"]
        ),
        ["addClientRole", device_id, role["rolename"]],
    ]
    return [["dynsec", *command] for command in commands]


def write_dynsec_config(path: Path, config: dict[str, Any]) -> None:
    _write_private(path, (json.dumps(config, indent=2) + "\n").encode())


def _dynsec_role(name: str, access: list[tuple[str, str]]) -> dict[str, Any]:
    acls = []
    for mode, topic in access:
        if "write" in mode:
            acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
        if "read" in mode:
            acls.append({"acltype": "subscribePattern", "topic": topic, "allow": True})
            acls.append({"acltype": "publishClientReceive", "topic": topic, "allow": True})
    return {"rolename": name, "acls": acls}


def _dynsec_client(user: str, password: str, role: str) -> dict[str, Any]:
    salt, digest = _pbkdf2(password)
    return {
        "username": user,
        "clientid": user,  # the plugin refuses any other client id for this user
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PBKDF2_ITERATIONS,
        "roles": [{"rolename": role}],
    }


# ---- password_file + acl_file ----------------------------------------------------------------
def acl_file_text(topics: Topics, servers: Sequence[str]) -> str:
    """`pattern` lines apply to every user (`%u` = the user name = the device id); `topic`
    lines before any `user` line would apply to anonymous clients only. `servers`: the
    server's user and its workers'."""
    lines = [
        "# Generated by sfprompt.",
        "# Every user: only the topics under its own name (%u = authenticated user name),",
        "# plus the server-status topic it must read.",
        *(f"pattern {mode} {topic}" for mode, topic in topics.device_access("%u")),
        "",
        "# The server (and its workers) read and write the whole tree.",
    ]
    for user in servers:
        lines.append(f"user {user}")
        lines.extend(f"topic {mode} {topic}" for mode, topic in topics.server_access())
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, topics: Topics, servers: Sequence[str]) -> None:
    """Mode 0600, like the password file: Mosquitto 2.0.16 and later warn about a world-readable
    acl_file (and say future versions will refuse it)."""
    _write_private(path, acl_file_text(topics, servers).encode())


def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """The `$7$` PBKDF2-SHA512 line format mosquitto 2 reads from its password_file."""
    salt, digest = _pbkdf2(password, salt)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"$7${PBKDF2_ITERATIONS}${encoded[0]}${encoded[1]}"


def write_password_file(path: Path, passwords: dict[str, str], use_tool: bool) -> None:
    """With `use_tool`, hashes come from `mosquitto_passwd` where it is installed. Users are
    added to an existing file, which keeps its owner and mode: root adds users (`--add`) to a
    file that the broker, running as its own account, must still read on SIGHUP."""
    before = path.stat() if path.exists() else None
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    if tool is None:
        lines = [f"{user}:{mosquitto_password_hash(pw)}" for user, pw in passwords.items()]
        old = path.read_bytes() if before else b""
        _write_private(path, old + ("\n".join(lines) + "\n").encode())
    else:
        path.touch(mode=0o600)
        for user, password in passwords.items():
            command = [tool, "-b", str(path), user, password]
            subprocess.run(command, check=True, capture_output=True)
    if before is not None:
        _restore_owner(path, before)


def _restore_owner(path: Path, before: os.stat_result) -> None:
    """Owner, group and mode as they were (mosquitto_passwd may rewrite the file as a new one)."""
    now = path.stat()
    if (now.st_uid, now.st_gid) != (before.st_uid, before.st_gid):
        os.chown(path, before.st_uid, before.st_gid)
    os.chmod(path, stat.S_IMODE(before.st_mode))


def _pbkdf2(password: str, salt: bytes | None = None) -> tuple[bytes, bytes]:
    salt = salt or os.urandom(SALT_BYTES)
    return salt, hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# ---- the server's embedded broker ------------------------------------------------------------
@dataclass(frozen=True)
class FleetAccess:
    """Who may use an embedded broker (no TLS there: a password each): the server's user and
    its workers' (`servers`, the whole tree), and each device (its own topics only)."""

    servers: tuple[str, ...]
    devices: tuple[str, ...]
    passwords: dict[str, str]  # user -> password, for every server user and device
    topics: Topics = field(default_factory=Topics)

    def __post_init__(self) -> None:
        users = [*self.servers, *self.devices]
        for user in users:
            check_device_id(user, "broker user")
        if len(set(users)) != len(users):
            clash = sorted({u for u in users if users.count(u) > 1})
            raise ValueError(
                f"user names must be distinct: {clash} is used twice (a device id "
                "cannot be the server's or a worker's user name)"
            )
        missing = [user for user in users if user not in self.passwords]
        if missing:
            raise ValueError(f"no password for {missing}")

    def write(self, folder: Path) -> list[str]:
        """Write the access files into `folder` (mode 0600) and return the mosquitto.conf lines
        that load them: the dynamic-security plugin where it is installed (it refuses a client
        id that is not the user's own, CONNACK 0x87), else password_file + acl_file with
        `use_username_as_clientid` (the broker replaces the client id by the user name, so no
        takeover either, but a wrong client id is renamed, not refused)."""
        plugin = find_dynsec_plugin()
        if plugin is not None:
            path = folder / "dynamic-security.json"
            config = dynsec_config(self.topics, self.servers, list(self.devices), self.passwords)
            write_dynsec_config(path, config)
            return [f"plugin {plugin}", f"plugin_opt_config_file {path}"]
        passwd, acl = folder / "passwd", folder / "acl"
        passwd.unlink(missing_ok=True)  # written afresh: the users of this run only
        write_password_file(passwd, self.passwords, use_tool=False)
        write_acl_file(acl, self.topics, self.servers)
        return [f"password_file {passwd}", f"acl_file {acl}", "use_username_as_clientid true"]


def fleet_passwords(folder: Path, users: Sequence[str]) -> dict[str, str]:
    """One password per user, in `folder/<user>/password` (folders 0700, files 0600): read if
    there (a restarted server keeps its devices' passwords), else made and written."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    passwords = {}
    for user in users:
        path = folder / check_device_id(user, "broker user") / "password"
        if path.is_file() and (text := path.read_text().strip()):
            passwords[user] = text
            continue
        path.parent.mkdir(mode=0o700, exist_ok=True)
        passwords[user] = secrets.token_urlsafe(24)
        _write_private(path, passwords[user].encode() + b"\n")
    return passwords
