"""A site broker bridged to a central one, both real Mosquittos started from broker-config's
files: device traffic crosses in the protocol's directions (request/reply with its MQTT v5
properties included), nothing outside the site devices' tree crosses, and the central broker
holds each site's bridge to its own devices' topics. Central in each access mode (dynsec with
certificate identity; acl-file with password identity)."""

from __future__ import annotations

import getpass
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfprompt.cloud_server.broker_bridge import BridgeOptions
from sfprompt.cloud_server.broker_config import (
    BrokerConfigOptions,
    _mosquitto_ctrl_as_admin,
    write_broker_config,
)
from sfprompt.cloud_server.cli import main
from sfprompt.protocol.broker import BrokerProcess, free_port
from sfprompt.protocol.client_config import ClientConfig, Inbound, TlsFiles, presence_will
from sfprompt.protocol.codec import encode
from sfprompt.protocol.messages import BodyOut, Message, Presence, ServerStatus, Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for

T = Topics()
SITES = ("site-a=cam-01,cam-02", "site-b=cam-03")
GRACE_S = 0.5  # after a later message crossed, how long an earlier one could still be on its way


@dataclass(frozen=True)
class Broker:
    folder: Path
    port: int
    process: BrokerProcess


@dataclass(frozen=True)
class Bridged:
    central: Broker
    site: Broker  # site-a: cam-01, cam-02
    rogue: Broker  # uses site-b's bridge user (cam-03) but claims cam-01 as well


def _write(folder: Path, devices: tuple[str, ...], **options: object) -> Broker:
    port = free_port()
    files = write_broker_config(
        BrokerConfigOptions(
            out=folder, devices=devices, port=port, bind="127.0.0.1",
            run_as=getpass.getuser(), **options,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    return Broker(folder, port, BrokerProcess(files.config, [port]))


def _site(folder: Path, central: Broker, user: str, devices: tuple[str, ...]) -> Broker:
    bridging = BridgeOptions(
        bridge_to=(f"localhost:{central.port}",),
        bridge_credentials=central.folder / "clients" / user,
    )
    return _write(folder, devices, bridging=bridging)


def _widen_server(broker: Broker) -> None:
    """Let the server user use every topic (`#`), so that the tests can publish outside the tree
    and see whether the bridge carries it; the devices and sites keep their rules."""
    dynsec = broker.folder / "dynamic-security.json"
    if dynsec.is_file():
        config = json.loads(dynsec.read_text())
        role = next(r for r in config["roles"] if r["rolename"] == "server")
        kinds = ("publishClientSend", "subscribePattern", "publishClientReceive")
        role["acls"] += [{"acltype": kind, "topic": "#", "allow": True} for kind in kinds]
        dynsec.write_text(json.dumps(config))
    else:
        acl = broker.folder / "acl"
        acl.write_text(acl.read_text().replace("user server\n", "user server\ntopic readwrite #\n"))


@pytest.fixture(scope="module", params=["dynsec", "acl-file"])
def bridged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridged]:
    root = tmp_path_factory.mktemp("bridge")
    identity = "certificate" if request.param == "dynsec" else "password"
    central = _write(
        root / "central", ("cam-09",), access=request.param, identity=identity,
        bridging=BridgeOptions(sites=SITES),
    )  # fmt: skip
    site = _site(root / "site-a", central, "site-a", ("cam-01", "cam-02"))
    rogue = _site(root / "rogue", central, "site-b", ("cam-03", "cam-01"))
    for broker in (central, site):
        _widen_server(broker)
    with central.process, site.process, rogue.process:
        yield Bridged(central, site, rogue)


def _client(broker: Broker, user: str, **options: object) -> MqttClient:
    """`user` connected to `broker` with its files from broker-config (ClientConfig options)."""
    folder = broker.folder / "clients" / user
    tls = TlsFiles(*(str(folder / name) for name in ("ca.crt", "client.crt", "client.key")))
    password = (folder / "password").read_text().strip()
    config = ClientConfig(
        user, "localhost", broker.port, username=user, password=password, tls=tls,
        reconnect_max_s=1, **options,  # type: ignore[arg-type]
    )  # fmt: skip
    return MqttClient(config).connect(20)


@pytest.fixture
def connect(bridged: Bridged) -> Iterator[Callable[..., MqttClient]]:
    """`_client`, closed after the test."""
    made: list[MqttClient] = []

    def make(broker: Broker, user: str, **options: object) -> MqttClient:
        made.append(_client(broker, user, **options))
        return made[-1]

    yield make
    for client in made:
        client.close(send_will=False)


@pytest.fixture(scope="module")
def status_seen(bridged: Bridged) -> None:
    """The server's retained status, published at the central broker, reached a device at each
    site broker: both bridges are up. (Its clients are closed again: a second client with the
    same id would take the session over.)"""
    server = _client(bridged.central, "server")
    server.publish(T.server_status(), ServerStatus(device_id="*", state="waiting"), retain=True)
    server.close(send_will=False)
    for broker, device in ((bridged.site, "cam-02"), (bridged.rogue, "cam-03")):
        client = _client(broker, device)
        seen = _collect(client, T.server_status())
        try:
            wait_for(seen.copy, what=f"the server status at {device}'s site broker")
        finally:
            client.close(send_will=False)


def _collect(client: MqttClient, topic_filter: str, prefix: str = "") -> list[Inbound]:
    """What arrives on `topic_filter` (only messages whose msg_id starts with `prefix`)."""
    got: list[Inbound] = []

    def keep(inbound: Inbound) -> None:
        if inbound.message.msg_id.startswith(prefix):
            got.append(inbound)

    client.subscribe(topic_filter, keep)
    return got


def _online(inbound: Inbound) -> bool:
    assert isinstance(inbound.message, Presence), inbound.message
    return inbound.message.online


def _smashed(device: str, msg_id: str, size: int = 4) -> Smashed:
    return Smashed(device_id=device, msg_id=msg_id, h=np.ones(size, np.float32))


def _body_out(device: str, msg_id: str) -> BodyOut:
    return BodyOut(device_id=device, msg_id=msg_id, z=np.ones((1, 1, 4), np.float32))


@pytest.mark.usefixtures("status_seen")
def test_device_traffic_crosses_the_bridge_in_its_direction(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """Up: a device at the site -> the server at the central broker; down: the server -> the
    device. The bridge is an MQTT v5 session (p5) that keeps its session (c0)."""
    server = connect(bridged.central, "server")
    up = _collect(server, T.all_up(), "up-")
    device = connect(bridged.site, "cam-01")
    down = _collect(device, T.device_inbox("cam-01"), "down-")
    device.publish(T.up("cam-01", "smashed"), _smashed("cam-01", "up-1"))
    server.publish(T.down("cam-01", "body_out"), _body_out("cam-01", "down-1"))
    wait_for(lambda: up and down, what="one message each way")
    assert [(i.topic, i.message.msg_id) for i in up] == [(T.up("cam-01", "smashed"), "up-1")]
    assert [(i.topic, i.message.msg_id) for i in down] == [(T.down("cam-01", "body_out"), "down-1")]
    log = bridged.central.process.log_path.read_text()
    assert " as site-a (p5, c0," in log


@pytest.mark.usefixtures("status_seen")
def test_request_and_reply_cross_with_their_v5_properties(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """A device's request (1 MiB SMASHED) over the site broker is answered by the server at the
    central broker: the response topic and correlation data crossed the bridge both ways."""
    server = connect(bridged.central, "server")

    def answer(inbound: Inbound) -> Message:
        assert inbound.response_topic == T.down("cam-02", "body_out")
        return _body_out(inbound.message.device_id, "reply-1")

    server.subscribe(T.all_up_of("smashed"), answer)
    device = connect(bridged.site, "cam-02")
    device.subscribe(T.device_inbox("cam-02"), lambda inbound: None)
    started = time.monotonic()
    request = _smashed("cam-02", "request-1", size=1 << 18)
    reply = device.request(T.up("cam-02", "smashed"), request, T.down("cam-02", "body_out"), 20)
    assert isinstance(reply, BodyOut) and reply.msg_id == "reply-1"
    assert time.monotonic() - started < 10


@pytest.mark.usefixtures("status_seen")
def test_presence_and_last_will_go_out_once(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """A device's retained presence and its Last Will, both published at the site broker, reach
    the server once each and stay retained at the central broker; nothing comes back to the
    site (the bridge carries presence out only). Counted in bytes off the wire, before the
    client's de-duplication could hide a repeat."""
    server = connect(bridged.central, "server")
    central_seen = _collect(server, T.presence("cam-02"))
    site_observer = connect(bridged.site, "server")
    _collect(site_observer, T.presence("cam-02"))
    online = Presence(device_id="cam-02", online=True)
    will = presence_will("cam-02")
    device = connect(bridged.site, "cam-02", will=will, session_expiry_s=0)
    device.publish(T.presence("cam-02"), online, retain=True)
    wait_for(lambda: central_seen, what="the presence at the server")
    device.close(send_will=True)
    wait_for(lambda: len(central_seen) == 2, what="the Last Will at the server")
    time.sleep(GRACE_S)
    assert [_online(i) for i in central_seen] == [True, False]
    both = len(encode(online)) + len(will[1])
    for observer in (server, site_observer):
        assert observer.traffic.snapshot()[1]["presence"] == both
    server.close(send_will=False)
    late = connect(bridged.central, "server")  # a fresh client: no de-duplication memory
    retained = _collect(late, T.presence("cam-02"))
    wait_for(lambda: retained, what="the retained presence at the central broker")
    assert _online(retained[0]) is False


@pytest.mark.usefixtures("status_seen")
def test_nothing_outside_the_site_devices_tree_crosses(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """Topics outside the tree, another protocol version's tree, other devices' topics and a
    device topic in the wrong direction stay where they were published; a marker sent after
    them crosses, so the bridge was up. (The server user may use `#` here: `_widen_server`.)"""
    central = connect(bridged.central, "server")
    site = connect(bridged.site, "server")
    at_central, at_site = _collect(central, "#", "probe-"), _collect(site, "#", "probe-")
    v2 = Topics(root="sfp/v2")
    stay_at_site = [
        "elsewhere/cam-01", v2.up("cam-01", "smashed"), T.up("cam-09", "smashed"),
        T.up("cam-03", "smashed"), T.down("cam-01", "body_out"),
    ]  # fmt: skip
    stay_at_central = [
        "elsewhere/cam-01", v2.down("cam-01", "body_out"), T.down("cam-09", "body_out"),
        T.down("cam-03", "body_out"), T.up("cam-01", "smashed"),
    ]  # fmt: skip
    for n, topic in enumerate(stay_at_site):
        site.publish(topic, _smashed("cam-01", f"probe-s{n}"))
    for n, topic in enumerate(stay_at_central):
        central.publish(topic, _smashed("cam-01", f"probe-c{n}"))
    site.publish(T.up("cam-01", "grad_z"), _smashed("cam-01", "probe-up-marker"))
    central.publish(T.down("cam-01", "grad_h"), _smashed("cam-01", "probe-down-marker"))

    def crossed() -> bool:  # each observer also sees what its own broker had published
        ids = {i.message.msg_id for i in at_central}, {i.message.msg_id for i in at_site}
        return "probe-up-marker" in ids[0] and "probe-down-marker" in ids[1]

    wait_for(crossed, what="the markers, each over the bridge")
    time.sleep(GRACE_S)
    assert {i.topic for i in at_central if i.message.msg_id.startswith("probe-s")} == set()
    assert {i.topic for i in at_site if i.message.msg_id.startswith("probe-c")} == set()


@pytest.mark.usefixtures("status_seen")
def test_the_central_broker_holds_a_site_to_its_own_devices(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """The rogue site bridges as site-b (device cam-03) but also claims cam-01 (site-a's): the
    central broker passes cam-03's traffic and neither takes cam-01's from it nor gives it
    cam-01's."""
    server = connect(bridged.central, "server")
    up = _collect(server, T.all_up(), "rogue-")
    impostor = connect(bridged.rogue, "cam-01")
    stolen = _collect(impostor, T.device_inbox("cam-01"), "rogue-")
    own = connect(bridged.rogue, "cam-03")
    own_down = _collect(own, T.device_inbox("cam-03"), "rogue-")
    real = connect(bridged.site, "cam-01")
    real_down = _collect(real, T.device_inbox("cam-01"), "rogue-")
    impostor.publish(T.up("cam-01", "smashed"), _smashed("cam-01", "rogue-forged"))
    own.publish(T.up("cam-03", "smashed"), _smashed("cam-03", "rogue-own"))
    server.publish(T.down("cam-01", "body_out"), _body_out("cam-01", "rogue-for-cam-01"))
    server.publish(T.down("cam-03", "body_out"), _body_out("cam-03", "rogue-for-cam-03"))
    wait_for(lambda: up and own_down and real_down, what="the allowed messages")
    time.sleep(GRACE_S)
    assert [i.message.msg_id for i in up] == ["rogue-own"]
    assert [i.message.msg_id for i in real_down] == ["rogue-for-cam-01"]
    assert stolen == []


@pytest.mark.usefixtures("status_seen")
def test_a_device_added_to_a_site_crosses_once_both_brokers_know_it(
    bridged: Bridged, connect: Callable[..., MqttClient]
) -> None:
    """`--add` on a site broker appends the device's topics to the bridge and prints what the
    central broker needs; done as printed (and the site restarted), the new device's traffic
    crosses both ways. Last in the module: it changes both brokers."""
    site = bridged.site
    result = CliRunner().invoke(
        main, ["broker-config", "--out", str(site.folder), "--add", "--devices", "cam-04"]
    )
    assert result.exit_code == 0, result.output
    conf = (site.folder / "mosquitto.conf").read_text()
    assert conf.endswith("topic sfp/v1/dev/cam-04/up/# out 1\ntopic sfp/v1/dev/cam-04/down/# in 1\n"
                         "topic sfp/v1/presence/cam-04 out 1\n")  # fmt: skip
    assert conf.count("topic sfp/v1/server/status in 1") == 1
    _do_central_steps(bridged.central, result.output)
    site.process.stop()
    site.process.start()
    server = connect(bridged.central, "server")
    up = _collect(server, T.all_up(), "added-")
    device = connect(site, "cam-04")
    down = _collect(device, T.device_inbox("cam-04"), "added-")
    wait_for(lambda: _crossed_up(device, up), what="cam-04's message at the server")
    server.publish(T.down("cam-04", "body_out"), _body_out("cam-04", "added-down"))
    wait_for(lambda: down, what="the server's message at cam-04")


def _crossed_up(device: MqttClient, up: list[Inbound]) -> bool:
    """Publish again until one arrives: the bridge reconnects after the restart on its own."""
    device.publish(
        T.up("cam-04", "smashed"), _smashed("cam-04", f"added-{len(up)}-{time.time_ns()}")
    )
    time.sleep(0.2)
    return bool(up)


def _do_central_steps(central: Broker, printed: str) -> None:
    """What `--add` printed for the central broker, done: the mosquitto_ctrl commands (dynsec)
    or the acl lines and SIGHUP (acl-file)."""
    lines = [line.strip() for line in printed.splitlines() if line.startswith("    ")]
    if (central.folder / "dynamic-security.json").is_file():
        admin = _mosquitto_ctrl_as_admin(central.folder, "localhost")
        for command in (line for line in lines if line.startswith("mosquitto_ctrl")):
            args = command.removeprefix("mosquitto_ctrl <admin options> ").split()
            ran = subprocess.run([*admin, *args], capture_output=True, text=True, timeout=30)
            assert ran.returncode == 0 and "rror" not in ran.stdout + ran.stderr, ran
    else:
        acl_lines = [line for line in lines if line.startswith(("user ", "topic "))]
        assert acl_lines[0] == "user site-a" and len(acl_lines) == 5, printed
        with (central.folder / "acl").open("a") as acl:
            acl.write("\n".join(acl_lines) + "\n")
        central.process.reload()
