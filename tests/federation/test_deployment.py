"""The path a person walks to run a fleet: the broker URL shown by default, a restarted server
back on the same address with its devices re-joining by themselves, no orphan broker, a taken
port refused, credentials that cannot work ending the device at once, and the README's fleet
across machines (network namespaces stand in for machines)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sfprompt.protocol.broker import BrokerProcess, free_port
from tests.federation.harness import (
    BIN,
    NO_TORCH,
    ROUND_FLAGS,
    brokers_of,
    finish,
    log_text,
    metrics_lines,
    stop_all,
    write_shards,
)
from tests.helpers import wait_for


def serve(*args: str, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`sfprompt-cloud serve` at its default log level (no -v)."""
    cmd = [*prefix, str(BIN / "sfprompt-cloud"), "serve", "--no-progress", *args]
    return subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def edge(*args: str, log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`sfprompt-edge start` at its default log level, torch made unloadable."""
    code = NO_TORCH + (
        "import sys\nfrom sfprompt.edge_client.cli import main\n"
        "sys.argv = ['sfprompt-edge', 'start', *sys.argv[1:]]\nmain()\n"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def login(device_id: str, out: Path) -> tuple[str, ...]:
    """What a device adds to log in to serve's embedded broker (a copy of its password file
    on a real device)."""
    password = out / "broker" / "clients" / device_id / "password"
    return ("--username", device_id, "--password-file", str(password))


@pytest.mark.slow
def test_restarted_server_comes_back_on_its_address_and_devices_rejoin(small_export, tmp_path):
    """Without -v the server says where devices connect; SIGKILLed, its broker goes with it;
    restarted on the same OUT it listens where it did, and the device carries on by itself."""
    shard = write_shards(tmp_path / "data", devices=1, per_device=32)[0]
    out = tmp_path / "server"
    args = (
        "--bundle", str(small_export.server_dir), "--out", str(out), "--rounds", "3",
        "--min-devices", "1", "--round-timeout", "60", "--devices", "pi-1", *ROUND_FLAGS,
    )  # fmt: skip
    server = serve(*args, log=tmp_path / "server1.log")
    device = None
    try:
        wait_for(lambda: (out / "broker_url").exists(), 60, "the broker URL")
        url = (out / "broker_url").read_text().strip()
        wait_for(lambda: url in log_text(tmp_path / "server1.log"), 10, "the URL in the log")
        (first_broker,) = brokers_of(server)
        device = edge(
            "--bundle", str(small_export.device_dir), "--data", str(shard), "--broker", url,
            "--device-id", "pi-1", "--request-timeout", "15", "--leave-when-server-stops",
            *login("pi-1", out), log=tmp_path / "pi-1.log",
        )  # fmt: skip
        wait_for(lambda: len(metrics_lines(out / "metrics.jsonl")) >= 1, 120, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait()
        first_broker.wait(10)  # no orphan broker holds the port (raises TimeoutExpired if so)
        server = serve(*args, log=tmp_path / "server2.log")
        assert finish(server, 240, tmp_path / "server2.log") == 0
        assert finish(device, 60, tmp_path / "pi-1.log") == 0
    finally:
        stop_all(server, *([device] if device else []))
    assert (out / "broker_url").read_text().strip() == url  # the same address after a restart
    assert [m["round"] for m in metrics_lines(out / "metrics.jsonl")] == [1, 2, 3]
    log = log_text(tmp_path / "pi-1.log")
    for said in (
        "connected to",
        "joined the federation",
        "round 1 done",
        "joined the federation again",
    ):
        assert said in log, f"{said!r} not in the device's log:\n{log[-3000:]}"
    assert log.count("joined the federation") == 2, log[-3000:]  # once, then once again


@pytest.mark.slow
def test_a_taken_port_is_refused_by_name(small_export, tmp_path):
    """Another process on the port: the server must not silently use somebody else's broker."""
    other = BrokerProcess(_plain_config(tmp_path, port := free_port()), [port]).start()
    try:
        server = serve(
            "--bundle", str(small_export.server_dir), "--out", str(tmp_path / "s"),
            "--listen", f"127.0.0.1:{port}", "--devices", "pi-1", log=tmp_path / "server.log",
        )  # fmt: skip
        code = finish(server, 120, tmp_path / "server.log")
    finally:
        other.stop()
    assert code == 1
    assert f"127.0.0.1:{port}" in log_text(tmp_path / "server.log")
    assert "taken" in log_text(tmp_path / "server.log")


def _plain_config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "other.conf"
    path.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    return path


@pytest.mark.parametrize("problem", ["password", "host"])
def test_device_stops_at_once_on_what_retrying_cannot_heal(small_export, tmp_path, problem):
    """A wrong password (broker-config's broker) or an unknown host: exit 3 with the cause,
    instead of retrying every 30 s forever."""
    import getpass

    from sfprompt.cloud_server.broker_config import BrokerConfigOptions, write_broker_config

    shard = write_shards(tmp_path / "data", devices=1, per_device=8)[0]
    port = free_port()
    files = write_broker_config(
        BrokerConfigOptions(
            out=tmp_path / "broker", devices=("pi-1",), port=port, bind="127.0.0.1",
            run_as=getpass.getuser(), identity="password",
        )
    )  # fmt: skip
    client = tmp_path / "broker" / "clients" / "pi-1"
    (tmp_path / "wrong").write_text("not-the-password\n")
    host = "localhost" if problem == "password" else "no-such-broker.invalid"
    with BrokerProcess(files.config, [port]):
        started = time.monotonic()
        device = edge(
            "--bundle", str(small_export.device_dir), "--data", str(shard),
            "--broker", f"mqtts://{host}:{port}", "--device-id", "pi-1",
            "--tls-ca", str(client / "ca.crt"), "--tls-cert", str(client / "client.crt"),
            "--tls-key", str(client / "client.key"), "--password-file", str(tmp_path / "wrong"),
            log=tmp_path / "pi-1.log",
        )  # fmt: skip
        code = finish(device, 60, tmp_path / "pi-1.log")
    log = log_text(tmp_path / "pi-1.log")
    assert code == 3, log
    assert time.monotonic() - started < 45
    assert ("refused" if problem == "password" else "unknown broker host") in log, log


# ---- the README's fleet, on three "machines" ----------------------------------------------------


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


class Machines:
    """Network namespaces on one bridge, each with its own address and /etc/hosts: the server
    at 10.78.0.1 known to the others as `server`, like separate machines on a LAN."""

    def __init__(self, names: list[str]) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"sfbr{tag}"
        self.spaces = {name: f"sfp-{tag}-{i}" for i, name in enumerate(names)}
        self.address = {name: f"10.78.0.{i + 1}" for i, name in enumerate(names)}

    def up(self) -> Machines:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        for i, (name, ns) in enumerate(self.spaces.items()):
            veth = f"{self.bridge}v{i}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts = Path("/etc/netns") / ns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            names = "".join(f"{a} {n}\n" for n, a in self.address.items())
            hosts.write_text(f"127.0.0.1 localhost\n{names}")
        return self

    def prefix(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.spaces[name])

    def down(self) -> None:
        for ns in self.spaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def machines() -> Iterator[Machines]:
    why = _netns_usable()
    if why:
        pytest.skip(why)
    fleet = Machines(["server", "pi-1", "pi-2"])
    try:
        fleet.up()
    except subprocess.CalledProcessError as exc:
        fleet.down()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr!r}")
    yield fleet
    fleet.down()


@pytest.mark.slow
def test_readme_fleet_runs_as_written_across_machines(small_export, tmp_path, machines):
    """README "Running a federation": the server listens on 0.0.0.0:1883 on its machine; two
    devices on two others connect to mqtt://server:1883 by name, and every round completes."""
    shards = write_shards(tmp_path / "data", devices=2, per_device=32)
    out = tmp_path / "server"
    server = serve(
        "--bundle", str(small_export.server_dir), "--test-data", str(tmp_path / "data/test.npz"),
        "--rounds", "2", "--min-devices", "2", "--listen", "0.0.0.0:1883", "--out", str(out),
        "--devices", "pi-1,pi-2",
        *ROUND_FLAGS, log=tmp_path / "server.log", prefix=machines.prefix("server"),
    )  # fmt: skip
    fleet = []
    try:
        wait_for(lambda: (out / "broker_url").exists(), 60, "the broker")
        for i, shard in enumerate(shards, start=1):
            fleet.append(
                edge(
                    "--bundle",
                    str(small_export.device_dir),
                    "--data",
                    str(shard),
                    "--broker",
                    "mqtt://server:1883",
                    "--device-id",
                    f"pi-{i}",
                    *login(f"pi-{i}", out),
                    "--leave-when-server-stops",
                    log=tmp_path / f"pi-{i}.log",
                    prefix=machines.prefix(f"pi-{i}"),
                )  # fmt: skip
            )
        assert finish(server, 240, tmp_path / "server.log") == 0
        for i, device in enumerate(fleet, start=1):
            assert finish(device, 60, tmp_path / f"pi-{i}.log") == 0
    finally:
        stop_all(server, *fleet)
    rounds = metrics_lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["accepted"]) == ["pi-1", "pi-2"] for r in rounds)
    for i in (1, 2):
        assert "connected to mqtt://server:1883" in log_text(tmp_path / f"pi-{i}.log")
