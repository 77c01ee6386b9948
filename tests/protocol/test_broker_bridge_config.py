"""`broker-config` for brokers beyond one node, as files: `--site` on the central broker,
`--bridge-to` on a site broker (the bridge block, its credentials and who owns them), and the
mistakes it names. test_broker_bridge.py runs such brokers."""

from __future__ import annotations

import getpass
import json
import os
import pwd
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfprompt.cloud_server.broker_bridge import BridgeOptions
from sfprompt.cloud_server.broker_config import BrokerConfigOptions, write_broker_config
from sfprompt.cloud_server.cli import main
from sfprompt.protocol.broker import BrokerProcess, free_port
from sfprompt.protocol.client_config import ClientConfig, Inbound, TlsFiles
from sfprompt.protocol.messages import Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for

T = Topics()


def test_cli_writes_central_and_site_and_names_mistakes(tmp_path: Path) -> None:
    """`--site` on the central broker, `--bridge-to` + `--bridge-credentials` on the site: the
    bridge carries each site device's topics in the protocol's direction, over MQTT v5, with
    the password only in files private to the broker."""
    runner = CliRunner()
    me = ["--run-as", getpass.getuser()]
    central = tmp_path / "central"
    result = runner.invoke(
        main, ["broker-config", "--out", str(central), *me, "--site", "s1=cam-1,cam-2"]
    )
    assert result.exit_code == 0, result.output
    dynsec = json.loads((central / "dynamic-security.json").read_text())
    client = next(c for c in dynsec["clients"] if c["username"] == "s1")
    assert client["clientid"] == "s1"
    assert [r["rolename"] for r in client["roles"]] == ["device-cam-1", "device-cam-2"]
    site = tmp_path / "site"
    bridge = ["--bridge-to", "central.example.org:8883", "--bridge-credentials"]
    result = runner.invoke(
        main,
        ["broker-config", "--out", str(site), *me, "--devices", "cam-1", "cam-2",
         *bridge, str(central / "clients" / "s1")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    conf = (site / "mosquitto.conf").read_text()
    for line in (
        "connection s1", "address central.example.org:8883", "bridge_protocol_version mqttv50",
        "remote_username s1", "remote_clientid s1", "cleansession false",
        "notifications_local_only true", "topic sfp/v1/dev/cam-1/up/# out 1",
        "topic sfp/v1/dev/cam-2/down/# in 1", "topic sfp/v1/presence/cam-2 out 1",
        f"bridge_keyfile {site.resolve() / 'bridge' / 'client.key'}",
    ):  # fmt: skip
        assert f"\n{line}\n" in conf, line
    assert conf.count("topic sfp/v1/server/status in 1\n") == 1
    assert " both " not in conf
    password = (central / "clients" / "s1" / "password").read_text().strip()
    assert f"remote_password {password}\n" in conf
    for private in (site / "mosquitto.conf", site / "bridge" / "client.key"):
        assert private.stat().st_mode & 0o777 == 0o600, private

    def fails(*args: str) -> str:
        out = runner.invoke(main, ["broker-config", "--out", str(tmp_path / "x"), *me, *args])
        assert out.exit_code != 0 and "Traceback" not in out.output, out.output
        assert not (tmp_path / "x").exists()  # nothing half-written
        return out.output

    assert "--bridge-credentials" in fails("--devices", "d", "--bridge-to", "c:8883")
    assert "HOST:PORT" in fails("--devices", "d", *bridge, str(central), "--bridge-to", "c")
    assert "lacks" in fails("--devices", "d", *bridge, str(tmp_path))
    assert "NAME=ID" in fails("--site", "s2")
    assert "connects to one broker" in fails("--site", "s2=a,b", "--site", "s3=b")
    assert "connects to one broker" in fails("--devices", "a", "--site", "s2=a")
    assert "not both" in fails("--site", "s2=a", "--bridge-to", "c:1")
    assert "user names" in fails("--devices", "a", "--site", "server=b")


def _mosquitto_account() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every account may pass through (pytest's own are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="sfprompt-bridge-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(
    os.geteuid() != 0 or _mosquitto_account() is None,
    reason="needs root and a mosquitto account: the files go to the broker's account",
)
def test_as_root_the_site_broker_owns_its_bridge_files_and_bridges(open_dir: Path) -> None:
    """Written and started as root: the site broker runs as `mosquitto`, which must read the
    bridge key at each connect and mosquitto.conf (the bridge password, 0600) on SIGHUP."""
    central_port, site_port = free_port(), free_port()
    central = write_broker_config(
        BrokerConfigOptions(
            out=open_dir / "central", devices=("cam-01",), port=central_port, bind="127.0.0.1",
            bridging=BridgeOptions(sites=("site-a=cam-02",)),
        )
    )  # fmt: skip
    bridging = BridgeOptions(
        bridge_to=(f"localhost:{central_port}",),
        bridge_credentials=open_dir / "central" / "clients" / "site-a",
    )
    site = write_broker_config(
        BrokerConfigOptions(
            out=open_dir / "site", devices=("cam-02",), port=site_port, bind="127.0.0.1",
            bridging=bridging,
        )
    )  # fmt: skip
    account = _mosquitto_account()
    assert account is not None
    for path in (site.config, open_dir / "site" / "bridge" / "client.key"):
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (account.pw_uid, 0o600), path
    with (
        BrokerProcess(central.config, [central_port]),
        BrokerProcess(site.config, [site_port]) as s,
    ):
        s.reload()  # rereads mosquitto.conf as `mosquitto`
        got: list[Inbound] = []
        server = _client(open_dir / "central", "server", central_port)
        server.subscribe(T.all_up(), got.append)
        device = _client(open_dir / "site", "cam-02", site_port)
        try:
            wait_for(lambda: _publish_until(device, got), what="cam-02's message at the server")
        finally:
            device.close(send_will=False)
            server.close(send_will=False)
        assert s.running and "Reloading config" in s.log_tail(50)


def _client(folder: Path, user: str, port: int) -> MqttClient:
    files = folder / "clients" / user
    tls = TlsFiles(*(str(files / name) for name in ("ca.crt", "client.crt", "client.key")))
    return MqttClient(ClientConfig(user, "localhost", port, username=user, tls=tls)).connect(20)


def _publish_until(device: MqttClient, got: list[Inbound]) -> bool:
    """Publish again until one arrives: the bridge may connect after the device."""
    device.publish(T.up("cam-02", "smashed"), Smashed(device_id="cam-02", h=np.ones(4, np.float32)))
    time.sleep(0.2)
    return bool(got)
