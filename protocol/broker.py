"""Run a private Mosquitto: the server's default broker, and the tests' real one.

When no broker URL is given the server starts its own Mosquitto on a free local port with a
generated config, so one command is enough to try sfprompt; production runs a broker of its own
(see `sfprompt-cloud broker-config` and docs/broker.md). The process is stopped on exit, and
`BrokerWatchdog` starts it again if it dies meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
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


def check_port_free(host: str, port: int) -> None:
    """Raise BrokerError if `host:port` cannot be bound now (another broker, a stale one...).

    Without this check a mosquitto that cannot bind exits while whatever already listens there
    accepts our connections: the server would silently use somebody else's broker."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as mosquitto binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            why = "is taken by another process (another broker?)" if taken else f"failed: {exc}"
            raise BrokerError(
                f"cannot listen on {host}:{port}: the address {why}; choose another --listen "
                "address or port, or stop what holds it"
            ) from None


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, even
    by SIGKILL, so a crashed server leaves no orphan broker holding its port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the broker may outlive a crashed server
        pass


class BrokerProcess:
    """A mosquitto process started from a config file, up once all `ports` accept connections."""

    def __init__(
        self,
        config_path: Path,
        ports: Sequence[int],
        host: str = "127.0.0.1",
        die_with_parent: bool = False,
    ) -> None:
        self.config_path = Path(config_path)
        self.ports = list(ports)
        self.host = host
        self.die_with_parent = die_with_parent
        self.log_path = self.config_path.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> int | None:
        """How the last process ended (-9: SIGKILL); None while it runs or before a start."""
        return None if self._process is None else self._process.poll()

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
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited at start:\n{self.log_tail()}")
            try:
                with socket.create_connection((self._dial_host, pending[0]), timeout=0.5):
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

    @property
    def _dial_host(self) -> str:
        """Where to check the listener: a wildcard address is reached on loopback."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

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


AccessWriter = Callable[[Path], list[str]]  # writes access files in a folder, returns conf lines


class EmbeddedBroker(BrokerProcess):
    """A Mosquitto with a generated config in `directory`, loopback only by default.

    `access` decides who may connect: it writes its files (passwords, access rules) into the
    folder and returns the mosquitto.conf lines that load them, and anonymous clients are then
    refused (`cloud_server.broker_access.FleetAccess` gives each device its own password and
    topics). Without it the broker is anonymous: for tests and library use on loopback; the
    server and the simulator always pass one, since any local process could otherwise read
    every device's traffic and publish in its name.

    `host` is the address it listens on (0.0.0.0: every interface, for devices on other
    machines). `persistence` keeps sessions and queued QoS 1 messages across restarts (saved
    every second and on a graceful stop). `max_packet_size` caps MQTT packets; clients learn it
    from CONNACK and chunk larger payloads. With `die_with_parent` the broker ends with the
    process (Linux: the thread) that started it, even if that one is killed.
    """

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        persistence: bool = False,
        max_packet_size: int | None = None,
        host: str = "127.0.0.1",
        die_with_parent: bool = False,
        access: AccessWriter | None = None,
    ) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="sfprompt-broker-")
        folder = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(host if host not in ("0.0.0.0", "::") else "")
        self.anonymous = access is None
        who = "anonymous" if access is None else "users with passwords only"
        lines = [
            f"# Generated by sfprompt: a private broker for one server ({who}).",
            "per_listener_settings false",
            f"allow_anonymous {'true' if access is None else 'false'}",
            f"listener {self.port} {host}",
            *(access(folder) if access is not None else []),  # after: some are per listener
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
        super().__init__(config_path, [self.port], host, die_with_parent)

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        """Refuse an address already taken, then start (see BrokerProcess.start)."""
        if not self.running:
            check_port_free(self.host, self.port)
        super().start(timeout)
        return self

    @property
    def url(self) -> str:
        """The URL to connect to it from this machine."""
        return f"mqtt://{url_host(self._dial_host)}:{self.port}"

    def public_url(self) -> str:
        """The URL devices on other machines use: this host's name when listening everywhere."""
        wildcard = self.host in ("0.0.0.0", "::", "")
        return f"mqtt://{url_host(socket.gethostname() if wildcard else self.host)}:{self.port}"

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


@dataclass(frozen=True)
class WatchPolicy:
    """How `BrokerWatchdog` watches: how often, and when it stops trying."""

    interval_s: float = 1.0  # how often it looks at the process
    max_failed_starts: int = 3  # in a row, before it gives up
    retry_delay_s: float = 2.0  # after a failed start; doubles each time, at most 10 s
    max_restarts: int = 10  # within `window_s`: a broker that keeps dying is not hidden
    window_s: float = 600.0

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.max_failed_starts < 1 or self.max_restarts < 1:
            raise ValueError(f"a watch needs a positive interval and at least one start: {self}")


class BrokerWatchdog:
    """Starts a broker again, with the same config on the same address, when its process dies.

    Clients reconnect by themselves and, with persistence, find their sessions and queued
    messages. The restart runs on this watchdog's own thread, which lives as long as the
    watch: with `die_with_parent` the broker is tied to the thread that started it. After
    `max_failed_starts` failed starts in a row, or more than `max_restarts` within `window_s`,
    it calls `on_give_up` with the reason and stops watching (`failure` keeps the reason).
    """

    def __init__(
        self,
        broker: BrokerProcess,
        on_give_up: Callable[[str], None],
        policy: WatchPolicy | None = None,
    ) -> None:
        self.broker = broker
        self.policy = policy or WatchPolicy()
        self.on_give_up = on_give_up
        self.restarts: list[float] = []  # monotonic times of restarts within the window
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watchdog", daemon=True)

    def start(self) -> BrokerWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before stopping the broker, or the watchdog would start it again)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            if not self.broker.running and not self._revive():
                return

    def _revive(self) -> bool:
        """Start the dead broker again; False (after `on_give_up`) when it gives up."""
        policy, now = self.policy, time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < policy.window_s]
        if len(self.restarts) >= policy.max_restarts:
            return self._give_up(
                f"the broker died {len(self.restarts) + 1} times within {policy.window_s:.0f}s; "
                f"not starting it again. Its log ends:\n{self.broker.log_tail()}"
            )
        code = self.broker.exit_code
        log.warning("the broker stopped (exit status %s); starting it again on its address", code)
        error: BrokerError | None = None
        for attempt in range(1, policy.max_failed_starts + 1):
            if self._stop.is_set():
                return False
            try:
                self.broker.start()
            except BrokerError as exc:
                log.error("starting the broker failed (%d/%d)", attempt, policy.max_failed_starts)
                error = exc
                self._stop.wait(min(policy.retry_delay_s * 2 ** (attempt - 1), 10.0))
                continue
            self.restarts.append(time.monotonic())
            log.warning("the broker is back (restart %d)", len(self.restarts))
            return True
        return self._give_up(
            f"the broker died and {policy.max_failed_starts} attempts to start it again failed; "
            f"the last one said: {error}"
        )

    def _give_up(self, reason: str) -> bool:
        log.error("%s", reason)
        self.failure = reason
        self.on_give_up(reason)
        return False


def url_host(host: str) -> str:
    """A host as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def parse_listen(value: str) -> tuple[str, int | None]:
    """`HOST:PORT`, `HOST`, `:PORT` (every interface) or `PORT` (loopback) -> (host, port or
    None, a free one); raises ValueError."""
    text = value.strip()
    host, port = "127.0.0.1", None
    if text.startswith("["):  # [::1]:1883
        inside, _, rest = text[1:].partition("]")
        host, text = inside, rest.lstrip(":")
        port_text = text
    elif text.count(":") == 1:
        host_text, port_text = text.split(":")
        host = host_text or "0.0.0.0"
    elif text.isdigit():  # a bare port: still loopback only
        port_text = text
    else:
        host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"--listen {value!r}: the port must be a number in 1-65535")
        port = int(port_text)
    return host, port
