"""The account Mosquitto runs as, and which of broker-config's files it must own.

`mosquitto -c mosquitto.conf` started as root reads the config, then switches to
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
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUN_AS = "mosquitto"  # mosquitto's own default, and the account its Debian package makes


@dataclass(frozen=True)
class BrokerAccount:
    """The account mosquitto runs as once started as root (the conf's `user`); uid and gid are
    set when this run hands the broker's files to it (only root can, and only to an account
    that exists here)."""

    name: str
    uid: int | None = None
    gid: int | None = None


def broker_account(
    run_as: str | None, install_dir: Path | None, out: Path, access_mode: str
) -> BrokerAccount:
    """`--run-as`, or by default `mosquitto` when run as root (or for another host,
    `--install-dir`), else the user running this, who then owns every file. Raises ValueError
    where the broker could not read its files: no such account here, or another account named
    by a user who cannot give files away."""
    root = os.geteuid() == 0
    me = "root" if root else _my_name()
    name = run_as or (DEFAULT_RUN_AS if root or install_dir else me)
    entry = _account(name)
    if entry is None and install_dir is None:
        raise ValueError(
            f"there is no account {name!r} here for mosquitto to run as: give --run-as USER "
            "(installing mosquitto, e.g. `apt-get install mosquitto`, makes the account "
            f"{DEFAULT_RUN_AS!r}), or --install-dir if the folder goes to another host"
        )
    if not root and name != me and install_dir is None:
        raise ValueError(_only_root_message(name, me, out, access_mode))
    if not root or entry is None or entry.pw_uid == 0:
        return BrokerAccount(name)
    return BrokerAccount(name, entry.pw_uid, entry.pw_gid)


def _only_root_message(name: str, me: str, out: Path, access_mode: str) -> str:
    """How to get a broker running as `name` when a normal user writes the files."""
    chown = chown_command(name, out.resolve(), access_mode)
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


def chown_command(name: str, home: Path, access_mode: str) -> str:
    return " ".join(["chown", f"{name}:", *map(str, _broker_owned(home, access_mode))])


def hand_over(out: Path, account: BrokerAccount, access_mode: str) -> None:
    """Give the broker's files to its account (their modes stay private: 0600, 0700)."""
    assert account.uid is not None and account.gid is not None
    for path in _broker_owned(out, access_mode):
        os.chown(path, account.uid, account.gid)


def check_reachable(account: BrokerAccount, out: Path) -> None:
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
