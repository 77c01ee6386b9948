"""Identity bound to the connection, against real Mosquitto brokers: a client id cannot be taken
over by another user (the victim stays connected), a certificate works only for its own user,
a reply goes only to the requester's own topics, and the embedded broker admits no anonymous
client and confines each device to its own topics (with the dynamic-security plugin, and with
password_file + acl_file where the plugin is missing)."""

from __future__ import annotations

import getpass
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sfprompt.cloud_server import broker_access
from sfprompt.cloud_server.broker_access import FleetAccess, fleet_passwords
from sfprompt.cloud_server.broker_config import (
    BrokerConfigFiles,
    BrokerConfigOptions,
    write_broker_config,
)
from sfprompt.protocol.broker import BrokerProcess, EmbeddedBroker, free_port
from sfprompt.protocol.client_config import ClientConfig, Inbound, TlsFiles
from sfprompt.protocol.errors import RequestTimeout, TransportError
from sfprompt.protocol.messages import (
    BROADCAST,
    BodyOut,
    GradH,
    GradZ,
    Message,
    PhaseSettings,
    Presence,
    ServerStatus,
    Smashed,
    Task,
    Update,
)
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for

T = Topics()
NOT_AUTHORIZED = 0x87
QUIET_S = 3.0  # how long a victim is watched for disconnections (takeovers came every ~0.4 s)


# ---- broker-config (TLS) ------------------------------------------------------------------------
@dataclass(frozen=True)
class Secured:
    files: BrokerConfigFiles
    port: int
    identity: str

    def client(
        self, client_id: str, user: str, cert_of: str | None = None, password_of: str | None = None
    ) -> MqttClient:
        """A client logging in as `user`, with the certificate and password of whoever is
        named (default: `user` itself)."""
        clients = self.files.config.parent / "clients"
        cert = clients / (cert_of or user)
        tls = TlsFiles(str(cert / "ca.crt"), str(cert / "client.crt"), str(cert / "client.key"))
        password = (clients / (password_of or user) / "password").read_text().strip()
        config = ClientConfig(
            client_id, "localhost", self.port, username=user, password=password, tls=tls,
            reconnect_min_s=0.1, reconnect_max_s=0.5,
        )  # fmt: skip
        return MqttClient(config)


@pytest.fixture(params=["certificate", "password"], scope="module")
def secured(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    """broker-config's output (dynsec) running on a free loopback port, in each identity mode."""
    port = free_port()
    options = BrokerConfigOptions(
        out=tmp_path_factory.mktemp("identity") / "broker",
        devices=("devA", "devB"),
        port=port,
        bind="127.0.0.1",
        run_as=getpass.getuser(),
        identity=request.param,
    )
    files = write_broker_config(options)
    with BrokerProcess(files.config, [port]):
        yield Secured(files, port, request.param)


@pytest.fixture
def opened() -> Iterator[list[MqttClient]]:
    """Clients to close at teardown."""
    clients: list[MqttClient] = []
    yield clients
    for client in clients:
        client.close(send_will=False)


def _stays_connected(*victims: MqttClient) -> None:
    time.sleep(QUIET_S)
    for victim in victims:
        assert victim.connected and victim.connects == 1, (
            f"{victim.config.client_id} was thrown off: {victim.connects} connections"
        )


@pytest.mark.slow
@pytest.mark.parametrize("victim_id", ["devA", "server"])
def test_a_forged_client_id_cannot_throw_the_victim_off(
    secured: Secured, opened: list[MqttClient], victim_id: str
) -> None:
    """devB's certificate and password with the client id of devA (or of the server): with
    password identity the broker refuses the CONNECT (dynsec pins the client id); with
    certificate identity it names the connection after the certificate (devB). Either way the
    victim keeps its session and devB gets nothing of the victim's."""
    victim = secured.client(victim_id, victim_id).connect(10)
    opened.append(victim)
    impostor = secured.client(victim_id, "devB")
    impostor.subscribe(T.device_inbox("devA"), lambda inbound: None)
    with pytest.raises(TransportError) as info:
        opened.append(impostor.connect(10))
    assert info.value.reason_code == NOT_AUTHORIZED and info.value.permanent
    _stays_connected(victim)


@pytest.mark.slow
def test_a_certificate_works_only_for_its_own_user(
    secured: Secured, opened: list[MqttClient]
) -> None:
    """devB's certificate with devA's user name, password and client id: the broker takes the
    user from the certificate, so the client is devB and devA's topics stay closed to it."""
    if secured.identity != "certificate":
        pytest.skip("Mosquitto 2.0 cannot tie a certificate to a password user (docs/broker.md)")
    victim = secured.client("devA", "devA").connect(10)
    opened.append(victim)
    impostor = secured.client("devA", "devA", cert_of="devB", password_of="devA").connect(10)
    opened.append(impostor)
    with pytest.raises(TransportError) as info:
        impostor.subscribe(T.device_inbox("devA"), lambda inbound: None)
    assert info.value.reason_code == NOT_AUTHORIZED
    with pytest.raises(TransportError) as info:
        impostor.publish(T.up("devA", "update"), _update("devA"))
    assert info.value.reason_code == NOT_AUTHORIZED
    _stays_connected(victim)


def test_password_identity_checks_the_password(secured: Secured) -> None:
    if secured.identity != "password":
        pytest.skip("certificate identity: Mosquitto 2.0 does not check the password")
    with pytest.raises(TransportError) as info:
        secured.client("devA", "devA", password_of="devB").connect(10)
    assert info.value.reason_code == NOT_AUTHORIZED and info.value.permanent


@pytest.mark.slow
def test_body_workers_log_in_as_users_of_their_own(
    tmp_path: Path, opened: list[MqttClient]
) -> None:
    """One user is one client id, so body workers get users of their own, with the server's
    rights, and run beside the server; `workers` or `identity` out of range is refused."""
    port = free_port()
    files = write_broker_config(
        BrokerConfigOptions(
            out=tmp_path / "b", devices=("devA",), port=port, bind="127.0.0.1",
            run_as=getpass.getuser(), workers=2,
        )
    )  # fmt: skip
    users = {"server", "server-worker-0", "server-worker-1", "devA", "admin"}
    assert set(files.client_dirs) == users
    with BrokerProcess(files.config, [port]):
        secured = Secured(files, port, "certificate")
        for user in ("server", "server-worker-0", "server-worker-1"):
            client = secured.client(f"sfprompt-{user}", user)
            client.subscribe(T.all_up_of("smashed"), lambda inbound: None)
            opened.append(client.connect(10))
        _stays_connected(*opened)
    with pytest.raises(ValueError, match="workers"):
        write_broker_config(BrokerConfigOptions(out=tmp_path / "c", devices=("a",), workers=-1))
    with pytest.raises(ValueError, match="identity"):
        write_broker_config(BrokerConfigOptions(out=tmp_path / "d", devices=("a",), identity="x"))


# ---- replies --------------------------------------------------------------------------------
class Spy:
    """A raw paho subscriber to the whole tree: what really crossed the broker, before any
    checks of sfprompt's client."""

    def __init__(self, port: int) -> None:
        self.topics: list[str] = []
        self.client = paho.Client(CallbackAPIVersion.VERSION2, "spy", protocol=paho.MQTTv5)
        self.client.on_message = lambda _c, _u, msg: self.topics.append(msg.topic)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{T.root}/#", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def spy(broker: EmbeddedBroker) -> Iterator[Spy]:
    watcher = Spy(broker.port)
    time.sleep(0.3)  # subscribed
    yield watcher
    watcher.close()


@pytest.mark.slow
def test_replies_go_only_to_the_requesters_own_topics(
    make_client: Callable[..., MqttClient], spy: Spy
) -> None:
    """A request whose MQTT v5 response topic is not its sender's own down-tree gets no reply,
    whether the handler returns it or answers later with `respond`: the server would otherwise
    publish where the requester may not (another device's inbox, the broadcasts)."""
    server = make_client("server")
    server.subscribe(T.all_up_of("smashed"), lambda inbound: _body_out(inbound.message))
    server.subscribe(
        T.all_up_of("grad_z"), lambda inbound: server.respond(inbound, _grad_h(inbound))
    )
    device = make_client("devB")
    device.subscribe(T.device_inbox("devB"), lambda inbound: None)
    h = np.ones((1, 2, 4), np.float32)
    foreign = [T.down("devA", "body_out"), f"{T.root}/broadcast/task", T.server_status()]
    foreign += ["other/topic"]
    foreign += [T.up("devB", "smashed"), f"{T.root}/dev/devB/down/nonsense"]
    for reply_topic in foreign:
        for kind, message in (("smashed", Smashed(device_id="devB", h=h)), ("grad_z", _grad_z())):
            with pytest.raises(RequestTimeout):
                device.request(T.up("devB", kind), message, reply_topic, timeout=0.5)
    time.sleep(0.5)
    requests = {T.up("devB", "smashed"): len(foreign), T.up("devB", "grad_z"): len(foreign)}
    seen = {topic: spy.topics.count(topic) for topic in set(spy.topics)}
    assert seen == requests, f"the server answered on some of {seen}"
    assert isinstance(
        device.request(T.up("devB", "smashed"), _smashed(), T.down("devB", "body_out"), 10), BodyOut
    )
    assert isinstance(
        device.request(T.up("devB", "grad_z"), _grad_z(), T.down("devB", "grad_h"), 10), GradH
    )


@pytest.mark.parametrize(
    ("request_topic", "response_topic", "allowed"),
    [
        (T.up("a", "smashed"), T.down("a", "body_out"), True),
        (T.up("a", "join"), T.down("a", "status"), True),
        (T.down("a", "task"), T.up("a", "error"), True),
        (T.up("a", "smashed"), T.down("b", "body_out"), False),
        (T.up("a", "smashed"), T.up("a", "smashed"), False),
        (T.up("a", "smashed"), f"{T.root}/broadcast/task", False),
        (T.up("a", "smashed"), T.presence("a"), False),
        (T.up("a", "smashed"), f"{T.root}/dev/a/down/unknown", False),
        (T.up("a", "smashed"), f"{T.root}/dev/a/down/body_out/x", False),
        (T.up("a", "smashed"), f"{T.root}/dev/+/down/body_out", False),
        (T.presence("a"), T.down("a", "status"), False),
        ("elsewhere/a", T.down("a", "status"), False),
    ],
)
def test_reply_topics_allowed(request_topic: str, response_topic: str, allowed: bool) -> None:
    assert T.reply_allowed(request_topic, response_topic) is allowed


# ---- the embedded broker --------------------------------------------------------------------
@dataclass(frozen=True)
class Fleet:
    broker: EmbeddedBroker
    passwords: dict[str, str]
    plugin: bool

    def client(
        self, client_id: str, user: str | None, password_of: str | None = None
    ) -> MqttClient:
        password = None if user is None else self.passwords[password_of or user]
        config = ClientConfig(
            client_id, "127.0.0.1", self.broker.port, username=user, password=password,
            reconnect_min_s=0.1, reconnect_max_s=0.5,
        )  # fmt: skip
        return MqttClient(config)


@pytest.fixture(params=["dynsec", "acl-file"])
def fleet(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    """An embedded broker for a server and devA, devB: with the dynamic-security plugin, and
    without it (password_file + acl_file)."""
    if request.param == "acl-file":
        monkeypatch.setattr(broker_access, "find_dynsec_plugin", lambda: None)
    elif broker_access.find_dynsec_plugin() is None:
        pytest.skip("Mosquitto's dynamic-security plugin is not installed here")
    passwords = fleet_passwords(tmp_path / "clients", ["server", "devA", "devB"])
    access = FleetAccess(("server",), ("devA", "devB"), passwords)
    with EmbeddedBroker(tmp_path / "broker", access=access.write) as broker:
        yield Fleet(broker, passwords, request.param == "dynsec")


def test_embedded_broker_refuses_anonymous_clients_and_wrong_passwords(fleet: Fleet) -> None:
    for client in (fleet.client("eve", None), fleet.client("devA", "devA", password_of="devB")):
        with pytest.raises(TransportError) as info:
            client.connect(10)
        assert info.value.permanent, info.value


def test_embedded_device_cannot_read_another_devices_topics(
    fleet: Fleet, opened: list[MqttClient]
) -> None:
    """devB cannot see devA's BODY_OUT: dynsec refuses the SUBSCRIBE, acl_file delivers
    nothing; devA gets its own."""
    server = fleet.client("server", "server").connect(10)
    dev_a = fleet.client("devA", "devA")
    got_a: list[Message] = []
    dev_a.subscribe(T.device_inbox("devA"), lambda inbound: got_a.append(inbound.message))
    dev_b = fleet.client("devB", "devB").connect(10)
    opened.extend([server, dev_a.connect(10), dev_b])
    stolen: list[Message] = []
    if fleet.plugin:
        with pytest.raises(TransportError) as info:
            dev_b.subscribe(T.device_inbox("devA"), lambda inbound: stolen.append(inbound.message))
        assert info.value.reason_code == NOT_AUTHORIZED
    else:
        dev_b.subscribe(T.device_inbox("devA"), lambda inbound: stolen.append(inbound.message))
    server.publish(T.down("devA", "body_out"), _body_out(_smashed("devA")))
    wait_for(lambda: len(got_a) == 1, what="devA's own BODY_OUT")
    time.sleep(0.5)
    assert stolen == []


def test_embedded_device_cannot_publish_as_another(fleet: Fleet, opened: list[MqttClient]) -> None:
    """devB's forged UPDATE, TASK, presence and server status are refused (PUBACK 0x87) and
    never reach the server or devA; devB's own UPDATE does."""
    server = fleet.client("server", "server")
    heard: list[tuple[str, str]] = []
    server.subscribe(T.all_up(), lambda inbound: heard.append((inbound.topic, "up")))
    server.subscribe(T.all_presence(), lambda inbound: heard.append((inbound.topic, "presence")))
    dev_a = fleet.client("devA", "devA")
    dev_a.subscribe(T.device_inbox("devA"), lambda inbound: heard.append((inbound.topic, "a")))
    dev_a.subscribe(T.server_status(), lambda inbound: heard.append((inbound.topic, "a")))
    dev_b = fleet.client("devB", "devB").connect(10)
    opened.extend([server.connect(10), dev_a.connect(10), dev_b])
    status = ServerStatus(device_id=BROADCAST, state="finished", text="forged")
    forged = [
        (T.up("devA", "update"), _update("devA"), False),
        (T.down("devA", "task"), _task("devA"), False),
        (f"{T.root}/broadcast/task", _task(BROADCAST), False),
        (T.presence("devA"), Presence(device_id="devA", online=True), True),
        (T.server_status(), status, True),
    ]
    for topic, message, retain in forged:
        with pytest.raises(TransportError) as info:
            dev_b.publish(topic, message, retain=retain)
        assert info.value.reason_code == NOT_AUTHORIZED, topic
    dev_b.publish(T.up("devB", "update"), _update("devB"))
    wait_for(lambda: (T.up("devB", "update"), "up") in heard, what="devB's own UPDATE")
    assert heard == [(T.up("devB", "update"), "up")]


@pytest.mark.slow
def test_embedded_forged_client_id_cannot_throw_a_device_off(
    fleet: Fleet, opened: list[MqttClient]
) -> None:
    """devB's password with devA's client id: dynsec refuses it; without the plugin the broker
    renames the connection devB (use_username_as_clientid). devA stays connected either way."""
    dev_a = fleet.client("devA", "devA").connect(10)
    server = fleet.client("server", "server").connect(10)
    opened.extend([dev_a, server])
    for victim in ("devA", "server"):
        impostor = fleet.client(victim, "devB")
        impostor.subscribe(T.device_inbox("devA"), lambda inbound: None)
        if fleet.plugin:
            with pytest.raises(TransportError) as info:
                opened.append(impostor.connect(10))
            assert info.value.reason_code == NOT_AUTHORIZED
        else:  # acl_file grants the SUBSCRIBE; the connection is devB's, not the victim's
            opened.append(impostor.connect(10))
    _stays_connected(dev_a, server)


# ---- messages -------------------------------------------------------------------------------
def _smashed(device_id: str = "devB") -> Smashed:
    return Smashed(device_id=device_id, h=np.ones((1, 2, 4), np.float32))


def _body_out(message: Message) -> BodyOut:
    return BodyOut(device_id=message.device_id, step=message.step, z=np.ones((1, 1, 4), np.float32))


def _grad_z() -> GradZ:
    return GradZ(device_id="devB", grad_z=np.ones((1, 1, 4), np.float32))


def _grad_h(inbound: Inbound) -> GradH:
    return GradH(device_id=inbound.message.device_id, grad_h=np.ones((1, 2, 4), np.float32))


def _update(device_id: str) -> Update:
    return Update(device_id=device_id, params={"prompt": np.ones(4, np.float32)}, samples=1)


def _task(device_id: str) -> Task:
    settings = PhaseSettings(
        keep_ratio=1.0, local_epochs=1, local_lr=1e-4, split_lr=0.1, deadline=2e9,
        split_epochs=1, batch_size=128, encoding="fp32", prune="class",
    )  # fmt: skip
    return Task(device_id=device_id, params={"prompt": np.ones(4, np.float32)}, settings=settings)
