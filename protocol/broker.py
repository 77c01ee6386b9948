"""Run a private Mosquitto: the server's default broker, and the tests' real one.

When no broker URL is given the server starts its own Mosquitto on a free local port with a
generated config, so one command is enough to try sfprompt; production runs a broker of its own
(see `sfprompt-cloud broker-config` and docs/broker.md). The process is stopped on exit.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

INSTALL_HINT = (
    "mosquitto (an MQTT broker) was not found; install it with `apt-get install -y mosquitto`"
    " (or `brew install mosquitto`), or give the URL of a running broker"
)


class BrokerError(RuntimeError):
    """The broker could not be found, started, or did not come up in time."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary ($PATH first, then the sbin folders distributions use)."""
    found = shutil.which("mosquitto")
    for candidate in (found, "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class BrokerProcess:
    """A mosquitto process started from a config file, up once all `ports` accept connections."""

    def __init__(self, config_path: Path, ports: Sequence[int], host: str = "127.0.0.1") -> None:
        self.config_path = Path(config_path)
        self.ports = list(ports)
        self.host = host
        self.log_path = self.config_path.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0) -> BrokerProcess:
        """Start and wait until every port accepts TCP connections; raises BrokerError."""
        if self.running:
            return self
        binary = find_mosquitto()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection((self.host, pending[0]), timeout=0.5):
                    pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise BrokerError(
                        f"mosquitto did not listen on {self.host}:{pending[0]} within {timeout}s:"
                        f"\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): mosquitto saves its persistence file first."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Abrupt stop (SIGKILL), as a crash or power loss would."""
        self._end(signal.SIGKILL, 10.0)

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads its password and ACL files (new users, changed rules)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGHUP)

    def _end(self, sig: int, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedBroker(BrokerProcess):
    """A loopback-only, anonymous Mosquitto with a generated config in `directory`.

    `persistence` keeps sessions and queued QoS 1 messages across restarts (saved every second
    and on a graceful stop). `max_packet_size` caps MQTT packets; clients learn it from CONNACK
    and chunk larger payloads.
    """

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        persistence: bool = False,
        max_packet_size: int | None = None,
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="sfprompt-broker-")
        folder = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        lines = [
            "# Generated by sfprompt: a private broker for one server, loopback only.",
            "per_listener_settings false",
            "allow_anonymous true",
            f"listener {self.port} 127.0.0.1",
            f"user {getpass.getuser()}",  # run as whoever started it (mosquitto drops root)
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_queued_messages 100000",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            "autosave_interval 1",
        ]
        if max_packet_size:
            lines.append(f"max_packet_size {max_packet_size}")
        config_path = folder / "mosquitto.conf"
        config_path.write_text("\n".join(lines) + "\n")
        super().__init__(config_path, [self.port])

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop and remove the generated folder if this object created it."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
