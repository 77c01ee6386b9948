"""`sfprompt-cloud broker-config` run as root, then `mosquitto -c OUT/mosquitto.conf` as root,
exactly as docs/broker.md says: mosquitto drops root to the conf's `user` before it opens its
key, access rules and data/, so those must belong to that account (they used to stay root's,
0600, and the broker could not start). Also a normal user's output started by root, and the
refusals that keep a broker from being set up with files it cannot read.

Needs root (to give files away and to start mosquitto as root), a mosquitto binary and its
`mosquitto` account; skipped otherwise."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from sfprompt.cloud_server.cli import main
from sfprompt.protocol.broker import BrokerError, BrokerProcess, find_mosquitto, free_port
from sfprompt.protocol.client_config import connection_config, read_password
from sfprompt.protocol.messages import Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root: broker-config must give files to the broker's account"
    try:
        find_mosquitto()
    except BrokerError:
        return "mosquitto is not installed"
    for account in ("mosquitto", "nobody"):
        try:
            pwd.getpwnam(account)
        except KeyError:
            return f"no {account!r} account on this machine"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")

T = Topics()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every account may pass through (pytest's own are 0700: mosquitto could not
    reach files under them once it has dropped root)."""
    folder = Path(tempfile.mkdtemp(prefix="sfprompt-root-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _broker_config(*args: str) -> str:
    result = CliRunner().invoke(main, ["broker-config", *args])
    assert result.exit_code == 0, result.output
    return result.output


def _connect(out: Path, user: str, port: int) -> MqttClient:
    """As a device does: its client folder's CA, certificate, key and password, over TLS."""
    folder = out / "clients" / user
    config = connection_config(
        f"mqtts://localhost:{port}",
        user,
        username=user,
        password=read_password(None, folder / "password"),
        tls_ca=str(folder / "ca.crt"),
        tls_cert=str(folder / "client.crt"),
        tls_key=str(folder / "client.key"),
        reconnect_max_s=1,
    )
    return MqttClient(config).connect(20)


def _round_trip(out: Path, port: int, device: str) -> None:
    """The server and `device` connect, and what the device sends on its topic arrives."""
    server, client = _connect(out, "server", port), _connect(out, device, port)
    try:
        got: list[Message] = []
        server.subscribe(T.all_up(), lambda inbound: got.append(inbound.message))
        client.publish(T.up(device, "smashed"), Smashed(device_id=device, h=np.ones(4, np.float32)))
        wait_for(lambda: len(got) == 1, what=f"{device} -> server")
        assert got[0].device_id == device
    finally:
        client.close(send_will=False)
        server.close(send_will=False)


def _owner(path: Path) -> tuple[str, int]:
    info = path.stat()
    return pwd.getpwuid(info.st_uid).pw_name, stat.S_IMODE(info.st_mode)


def _assert_no_permission_errors(broker: BrokerProcess) -> None:
    log = broker.log_path.read_text(errors="replace")
    for sign in ("Permission denied", "not readable", "Unable to", "Error"):
        assert sign not in log, log


@pytest.mark.parametrize("access", ["dynsec", "acl-file"])
def test_root_output_starts_as_documented(open_dir: Path, access: str) -> None:
    """Written as root, started as root: the broker runs as `mosquitto`, owns its key, rules
    and data/, and serves the devices; `--add` later keeps that (dynsec: the plugin saves the
    new device in its JSON, which needs the folder; acl-file: passwd stays readable on SIGHUP)."""
    out, port = open_dir / "broker", free_port()
    devices = ["--devices", "cam-01", "cam-02"]
    _broker_config("--out", str(out), "--port", str(port), "--access", access, *devices)
    with BrokerProcess(out / "mosquitto.conf", [port]) as broker:  # BrokerError: its log
        _round_trip(out, port, "cam-01")
        _broker_config("--out", str(out), "--add", "--devices", "cam-03")
        if access == "dynsec":
            saved = out / "dynamic-security.json"
            wait_for(lambda: '"cam-03"' in saved.read_text(), what="the plugin saving cam-03")
        else:
            broker.reload()
        _round_trip(out, port, "cam-03")
        _assert_no_permission_errors(broker)
    assert "user mosquitto\n" in (out / "mosquitto.conf").read_text()
    rules = ["dynamic-security.json"] if access == "dynsec" else ["passwd", "acl"]
    assert all(_owner(out / name) == ("mosquitto", 0o600) for name in rules)
    assert _owner(out / "certs" / "server.key") == ("mosquitto", 0o600)
    assert _owner(out / "data") == ("mosquitto", 0o700)
    assert (out / "data" / "mosquitto.db").is_file()  # persistence written as mosquitto
    assert _owner(out / "certs" / "ca.key") == ("root", 0o600)  # the broker never needs these
    assert _owner(out / "clients") == ("root", 0o700)
    assert _owner(out / "clients" / "cam-03") == ("root", 0o700)


def test_normal_users_output_starts_when_root_starts_it(open_dir: Path) -> None:
    """Written by a normal user (nobody), who owns every file: the conf says `user nobody`,
    so mosquitto started as root runs as the files' owner and can read them."""
    home = open_dir / "home"
    home.mkdir()
    shutil.chown(home, "nobody")
    out, port = home / "broker", free_port()
    result = _as_nobody("--out", str(out), "--port", str(port), "--devices", "cam-01")
    assert result.exit_code == 0, result.output
    with BrokerProcess(out / "mosquitto.conf", [port]) as broker:
        _round_trip(out, port, "cam-01")
        _assert_no_permission_errors(broker)
    assert "user nobody\n" in (out / "mosquitto.conf").read_text()
    assert _owner(out / "certs" / "server.key") == ("nobody", 0o600)


def test_normal_user_cannot_name_another_account(open_dir: Path) -> None:
    """Only root can give files away: the refusal says how to do it, and nothing is written."""
    home = open_dir / "home"
    home.mkdir()
    shutil.chown(home, "nobody")
    out = home / "broker"
    result = _as_nobody("--out", str(out), "--run-as", "mosquitto", "--devices", "cam-01")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "only root" in message and "sudo" in message
    assert f"chown mosquitto: {out}" in message and "Traceback" not in message
    assert not out.exists()


def test_folder_the_broker_cannot_reach_is_refused(tmp_path: Path) -> None:
    """pytest's tmp_path lies under a 0700 folder: mosquitto, once it is `mosquitto`, could not
    open anything there, so broker-config says so before writing anything."""
    out = tmp_path / "broker"
    result = CliRunner().invoke(main, ["broker-config", "--out", str(out), "--devices", "cam-01"])
    assert result.exit_code == 1
    assert "could not reach" in result.output and "chmod o+x" in result.output
    assert not out.exists()


def test_install_dir_names_files_where_they_will_live(tmp_path: Path) -> None:
    """With --install-dir the folder goes elsewhere: paths, and the chown to run there, name
    that place; an account that does not exist here is fine (it is on the broker host)."""
    out = tmp_path / "broker"
    args = ["--out", str(out), "--install-dir", "/srv/mqtt", "--run-as", "no-such-user-here"]
    _broker_config(*args, "--devices", "cam-01")
    conf = (out / "mosquitto.conf").read_text()
    assert "user no-such-user-here\n" in conf
    assert "chown no-such-user-here: /srv/mqtt /srv/mqtt/data /srv/mqtt/certs/server.key" in conf
    assert "keyfile /srv/mqtt/certs/server.key" in conf
    assert _owner(out / "certs" / "server.key") == ("root", 0o600)  # nobody to give it to


def _as_nobody(*args: str) -> Result:
    """The CLI run by a normal user, the `nobody` account: in this process with that effective
    uid and gid for the call (a subprocess could not run this virtualenv's Python, which may
    live under root's 0700 home), then root again."""
    nobody = pwd.getpwnam("nobody")
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        return CliRunner().invoke(main, ["broker-config", *args])
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)
