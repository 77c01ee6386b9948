"""`sfprompt-cloud broker-config` against a real Mosquitto started from its output, with each
access mode: TLS with the generated certificates works, a wrong password and a missing client
certificate are refused, and each device is confined to its own topics: the broker refuses a
PUBLISH (PUBACK 0x87) and, with the dynamic-security plugin, a SUBSCRIBE (SUBACK 0x87)."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfprompt.cloud_server import broker_access
from sfprompt.cloud_server.broker_config import (
    BrokerConfigFiles,
    BrokerConfigOptions,
    write_broker_config,
)
from sfprompt.cloud_server.cli import main
from sfprompt.protocol.broker import BrokerProcess, free_port
from sfprompt.protocol.client_config import ClientConfig, TlsFiles
from sfprompt.protocol.errors import TransportError
from sfprompt.protocol.messages import Message, Smashed, Task
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for

T = Topics()
NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


@dataclass(frozen=True)
class Secured:
    files: BrokerConfigFiles
    port: int
    access: str
    broker: BrokerProcess


@pytest.fixture(
    params=["dynsec", "acl-file/mosquitto_passwd", "acl-file/python-hash"], scope="module"
)
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    """A broker running the generated config on a free loopback port (each access mode, and
    both password writers for the password file)."""
    access, _, hasher = request.param.partition("/")
    port = free_port()
    options = BrokerConfigOptions(
        out=tmp_path_factory.mktemp("secure") / "broker",
        devices=("cam-01", "cam-02"),
        port=port,
        bind="127.0.0.1",
        run_as=getpass.getuser(),
        access=access,
        identity="password",  # user = password's; test_identity.py covers certificate identity
    )
    files = write_broker_config(options, use_tool=hasher != "python-hash")
    with BrokerProcess(files.config, [port]) as broker:
        yield Secured(files, port, access, broker)


def _connect(
    secured: Secured,
    user: str,
    password: str | None = None,
    with_cert: bool = True,
    timeout: float = 20,
) -> MqttClient:
    folder = secured.files.config.parent / "clients" / user
    tls = TlsFiles(
        str(folder / "ca.crt"),
        str(folder / "client.crt") if with_cert else None,
        str(folder / "client.key") if with_cert else None,
    )
    secret = password or (folder / "password").read_text().strip()
    config = ClientConfig(
        user, "localhost", secured.port, username=user, password=secret, tls=tls, reconnect_max_s=1
    )
    return MqttClient(config).connect(timeout)


@pytest.fixture
def clients(secured: Secured) -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(user: str, **kwargs: object) -> MqttClient:
        made.append(_connect(secured, user, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for client in made:
        client.close(send_will=False)


def test_tls_with_generated_certificates_carries_traffic(
    clients: Callable[..., MqttClient],
) -> None:
    """Server and device talk over TLS (hostname checked against the broker certificate)."""
    server = clients("server")
    got: list[Message] = []
    server.subscribe(T.all_up(), lambda inbound: got.append(inbound.message))
    device = clients("cam-01")
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: got.append(inbound.message))
    device.subscribe(T.server_status(), lambda inbound: None)
    device.publish(T.up("cam-01", "smashed"), Smashed(device_id="cam-01", h=np.ones(4, np.float32)))
    wait_for(lambda: len(got) == 1, what="device -> server")
    assert got[0].kind == "smashed"


def test_device_cannot_read_another_devices_topics(
    secured: Secured, clients: Callable[..., MqttClient]
) -> None:
    """With the dynamic-security plugin the broker refuses the SUBSCRIBE itself (SUBACK 0x87)
    for another device's topics, its presence, every device's traffic or the whole tree. Mosquitto
    2.0's acl_file grants the SUBSCRIBE and delivers nothing (why dynsec is the default). Either
    way the spy then receives its own message and nothing of the victim's."""
    spy = clients("cam-01")
    leaked: list[Message] = []
    forbidden = (T.device_inbox("cam-02"), T.all_up(), f"{T.root}/#", T.presence("cam-02"))
    for topic in forbidden:
        if secured.access == "dynsec":
            with pytest.raises(TransportError) as info:
                spy.subscribe(topic, lambda inbound: leaked.append(inbound.message))
            assert info.value.reason_code == NOT_AUTHORIZED, topic
        else:
            spy.subscribe(topic, lambda inbound: leaked.append(inbound.message))
    spy.subscribe(T.device_inbox("cam-01"), lambda inbound: leaked.append(inbound.message))
    victim = clients("cam-02")
    theirs: list[Message] = []
    victim.subscribe(T.device_inbox("cam-02"), lambda inbound: theirs.append(inbound.message))
    victim.publish(T.presence("cam-02"), Smashed(device_id="cam-02", h=np.ones(4, np.float32)))
    victim.publish(T.up("cam-02", "smashed"), Smashed(device_id="cam-02", h=np.ones(4, np.float32)))
    server = clients("server")
    server.publish(T.down("cam-02", "body_out"), _body_out("cam-02"))
    server.publish(T.down("cam-01", "body_out"), _body_out("cam-01"))  # the spy's own: arrives
    wait_for(lambda: len(theirs) == 1 and len(leaked) >= 1, what="own messages")
    assert [m.device_id for m in leaked] == ["cam-01"]


def test_device_cannot_publish_on_another_devices_topics(
    clients: Callable[..., MqttClient],
) -> None:
    """PUBACK 0x87 for a publish on another device's topic (or as the server), and nothing
    reaches the subscriber; the device's own topic still works afterwards."""
    server = clients("server")
    got: list[Message] = []
    server.subscribe(T.all_up(), lambda inbound: got.append(inbound.message))
    device = clients("cam-01")
    forged = Smashed(device_id="cam-02", h=np.ones(4, np.float32))
    for topic in (T.up("cam-02", "smashed"), T.down("cam-02", "body_out")):
        with pytest.raises(TransportError) as info:
            device.publish(topic, forged)
        assert info.value.reason_code == NOT_AUTHORIZED, topic
    settings_task = Task(device_id="*", params={}, settings=_settings())
    with pytest.raises(TransportError):
        device.publish(f"{T.root}/broadcast/task", settings_task)
    device.publish(T.up("cam-01", "smashed"), Smashed(device_id="cam-01", h=np.ones(4, np.float32)))
    wait_for(lambda: len(got) == 1, what="own topic")
    assert got[0].device_id == "cam-01"  # the forged message never arrived


def test_wrong_password_is_refused(secured: Secured) -> None:
    with pytest.raises(TransportError) as info:
        _connect(secured, "cam-01", password="not-the-password")
    assert info.value.reason_code in (BAD_CREDENTIALS, NOT_AUTHORIZED)
    assert info.value.permanent and "refused 'cam-01' (user 'cam-01')" in str(info.value)


def test_missing_client_certificate_is_refused(secured: Secured) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        _connect(secured, "cam-01", with_cert=False, timeout=10)
    assert info.value.permanent and "client certificate" in str(info.value)
    assert time.monotonic() - started < 8  # says so at once rather than at the timeout


def test_a_device_id_other_than_its_user_is_refused_for_good(secured: Secured) -> None:
    """cam-01's credentials with device id cam-02: its inbox is cam-02's, which the broker
    refuses cam-01 (dynsec answers the SUBSCRIBE; acl-file silently grants it)."""
    if secured.access != "dynsec":
        pytest.skip("acl-file grants a forbidden SUBSCRIBE and delivers nothing")
    folder = secured.files.config.parent / "clients" / "cam-01"
    tls = TlsFiles(str(folder / "ca.crt"), str(folder / "client.crt"), str(folder / "client.key"))
    config = ClientConfig(
        "cam-02", "localhost", secured.port, username="cam-01",
        password=(folder / "password").read_text().strip(), tls=tls,
    )  # fmt: skip
    client = MqttClient(config)
    client.subscribe(T.device_inbox("cam-02"), lambda inbound: None)
    with pytest.raises(TransportError) as info:
        client.connect(10)
    assert info.value.permanent and "must be the device's broker user" in str(info.value)


def test_cli_writes_config_and_turns_mistakes_into_messages(tmp_path: Path) -> None:
    """--run-as the writer: as root the default (`mosquitto`) could not reach pytest's 0700
    temporary folders, which test_broker_config_root.py covers."""
    runner = CliRunner()
    me = ["--run-as", getpass.getuser()]
    result = runner.invoke(
        main, ["broker-config", "--out", str(tmp_path / "a"), *me, "--devices", "cam-1", "cam-2"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "clients" / "cam-2" / "client.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a" / "clients").stat().st_mode & 0o777 == 0o700
    assert f"user {getpass.getuser()}\n" in (tmp_path / "a" / "mosquitto.conf").read_text()
    dynsec = json.loads((tmp_path / "a" / "dynamic-security.json").read_text())
    roles = {role["rolename"]: role["acls"] for role in dynsec["roles"]}
    sends = {acl["topic"] for acl in roles["device-cam-1"] if acl["acltype"] == "publishClientSend"}
    assert sends == {"sfp/v1/dev/cam-1/up/#", "sfp/v1/presence/cam-1"}
    assert {c["username"] for c in dynsec["clients"]} == {"server", "cam-1", "cam-2", "admin"}
    assert dynsec["defaultACLAccess"]["subscribe"] is False
    assert "dynamic_security" in (tmp_path / "a" / "mosquitto.conf").read_text()

    classic = [*me, "--access", "acl-file", "--devices", "cam-1"]
    result = runner.invoke(main, ["broker-config", "--out", str(tmp_path / "c"), *classic])
    assert result.exit_code == 0, result.output
    acl = (tmp_path / "c" / "acl").read_text()
    assert "pattern write sfp/v1/dev/%u/up/#" in acl and "user server" in acl
    assert (tmp_path / "c" / "passwd").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "c" / "acl").stat().st_mode & 0o777 == 0o600

    bad = runner.invoke(main, ["broker-config", "--out", str(tmp_path / "b"), "--devices", "a/b"])
    assert bad.exit_code == 1 and "device id" in bad.output and "Traceback" not in bad.output
    again = runner.invoke(main, ["broker-config", "--out", str(tmp_path / "a"), "--devices", "x"])
    assert again.exit_code == 1 and "not empty" in again.output
    admin = runner.invoke(
        main, ["broker-config", "--out", str(tmp_path / "d"), "--devices", "admin"]
    )
    assert admin.exit_code == 1 and "reserved" in admin.output
    assert "broker-config" in runner.invoke(main, ["--help"]).output


def test_missing_dynsec_plugin_names_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_access, "find_dynsec_plugin", lambda: None)
    result = CliRunner().invoke(
        main, ["broker-config", "--out", str(tmp_path / "a"), "--devices", "cam-1"]
    )
    assert result.exit_code == 1
    assert "--dynsec-plugin" in result.output and "--access acl-file" in result.output
    assert not (tmp_path / "a").exists()  # nothing half-written


_ONES = np.ones(4, np.float32)


def _body_out(device_id: str) -> Message:
    from sfprompt.protocol.messages import BodyOut

    return BodyOut(device_id=device_id, z=np.ones((1, 1, 4), np.float32))


def _settings():  # type: ignore[no-untyped-def]
    from sfprompt.protocol.messages import PhaseSettings

    return PhaseSettings(
        keep_ratio=1.0, local_epochs=1, local_lr=1e-4, split_lr=0.1, deadline=2e9,
        split_epochs=1, batch_size=128, encoding="fp32", prune="class",
    )  # fmt: skip


def test_devices_added_later_are_confined_like_the_first(secured: Secured) -> None:
    """`broker-config --add`: the new device gets a certificate and password, and the broker
    (dynsec: live through mosquitto_ctrl; acl-file: after SIGHUP) lets it in and confines it."""
    result = CliRunner().invoke(
        main,
        ["broker-config", "--out", str(secured.files.config.parent), "--add", "--devices", "cam-9"],
    )
    assert result.exit_code == 0, result.output
    if secured.access != "dynsec":
        secured.broker.reload()
    newcomer = _connect(secured, "cam-9")
    try:
        got: list[Message] = []
        newcomer.subscribe(T.device_inbox("cam-9"), lambda inbound: got.append(inbound.message))
        with pytest.raises(TransportError) as info:
            newcomer.publish(T.up("cam-01", "smashed"), Smashed(device_id="cam-01", h=_ONES))
        assert info.value.reason_code == NOT_AUTHORIZED
        if secured.access == "dynsec":
            with pytest.raises(TransportError):
                newcomer.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
        server = _connect(secured, "server")
        server.publish(T.down("cam-9", "body_out"), _body_out("cam-9"))
        wait_for(lambda: len(got) == 1, what="the new device's own message")
        server.close(send_will=False)
    finally:
        newcomer.close(send_will=False)
    again = CliRunner().invoke(
        main,
        ["broker-config", "--out", str(secured.files.config.parent), "--add", "--devices", "cam-9"],
    )
    assert again.exit_code == 1 and "already" in again.output
