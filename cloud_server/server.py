"""`sfprompt-cloud serve` and `sfprompt-cloud worker`: wire the parts together and run.

serve: (embedded broker) -> MQTT client -> body model + batcher + split service -> round
coordinator, with checkpoints, JSON-lines metrics, a progress display and optional Prometheus.
worker: only the body service, for a fleet of GPUs sharing the devices (docs/cloud_server.md).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sfprompt.protocol.broker import BrokerError, BrokerWatchdog, EmbeddedBroker, parse_listen
from sfprompt.protocol.client_config import ClientConfig, connection_config, read_password
from sfprompt.protocol.codec import encode, expectations_for
from sfprompt.protocol.messages import BROADCAST, ServerStatus, check_device_id
from sfprompt.protocol.mqtt_client import MqttClient

from . import broker_access
from .batcher import BodyBatcher
from .body_model import BodyConfig, ServerModel
from .body_service import BodyService, worker_of
from .metrics import MetricsLog, PrometheusExporter, RoundMetrics
from .rounds import Coordinator, RoundConfig
from .step_state import StepStore

log = logging.getLogger(__name__)

# Seeds the choice of the evaluated test images: the same ones every round and after a restart,
# so accuracies of one run (and of runs with the same --eval-samples) compare like with like.
EVAL_SEED = 0


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in; no URL means an embedded Mosquitto."""

    url: str | None = None
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    embedded_port: int | None = None  # the embedded broker's port (default: a free one)
    listen: str | None = None  # the embedded broker's HOST:PORT (default: loopback, free port)
    password_file: Path | None = None  # read the password from here (not visible in `ps`)
    devices: tuple[str, ...] = ()  # who the embedded broker admits ("a,b" items are split)

    def client_config(self, url: str, client_id: str, **options: object) -> ClientConfig:
        """Where brokers pin a user to one client id (broker-config, the embedded broker), a
        client that logs in uses its user name as client id; `client_id` is for anonymous use."""
        return connection_config(
            url,
            self.username or client_id,
            username=self.username,
            password=read_password(self.password, self.password_file),
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            **options,
        )


@dataclass(frozen=True)
class ModelSource:
    """A server bundle folder, or a timm model cut the way the exporter cuts it."""

    bundle: Path | None = None
    model: str | None = None
    num_classes: int = 10
    prompts: int = 10
    head_blocks: int = 1
    tail_blocks: int = 0
    pretrained: bool = False
    weights: Path | None = None
    model_args: dict = field(default_factory=dict)
    seed: int = 0

    def load(self, body: BodyConfig) -> ServerModel:
        if self.bundle is not None:
            return ServerModel.from_bundle(self.bundle, body)
        if self.model is None:
            raise ValueError("give a server bundle (--bundle) or a timm model name (--model)")
        from sfprompt.export.bundle_writer import ExportConfig

        export = ExportConfig(
            model=self.model,
            num_classes=self.num_classes,
            pretrained=self.pretrained,
            checkpoint=self.weights,
            model_args=dict(self.model_args),
            prompts=self.prompts,
            head_blocks=self.head_blocks,
            tail_blocks=self.tail_blocks,
            seed=self.seed,
        )
        return ServerModel.from_timm(export, body)


@dataclass(frozen=True)
class ServeConfig:
    source: ModelSource = field(default_factory=ModelSource)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    body: BodyConfig = field(default_factory=BodyConfig)
    out: Path = Path("runs/server")
    test_data: Path | None = None  # evaluated after every round (ImageFolder, CIFAR, .npz, IDX)
    eval_samples: int | None = 2000  # a fixed stratified subset of the test set; None: all
    max_batch: int = 256  # cross-device batching: samples per body call
    max_wait_ms: float = 5.0  # how long a body call waits for other devices' requests
    body_workers: int = 0  # 0: serve the body here; N: N `sfprompt-cloud worker`s do
    metrics_port: int | None = None
    progress: bool = True
    client_id: str = "sfprompt-server"  # with a broker user name, that name is the client id


@dataclass(frozen=True)
class WorkerConfig:
    source: ModelSource = field(default_factory=ModelSource)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    body: BodyConfig = field(default_factory=BodyConfig)
    index: int = 0
    workers: int = 1
    max_batch: int = 256
    max_wait_ms: float = 5.0
    state_ttl_s: float = 600.0


SERVER_USER = "server"  # the server's user on its embedded broker (as broker-config's default)


@contextmanager
def broker_url(
    settings: BrokerSettings,
    out: Path,
    workers: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[BrokerSettings]:
    """The broker to use, as settings with its URL and this server's login: the given URL, or
    an embedded Mosquitto that ends with this process.

    The embedded broker admits only the server, its `workers` and `settings.devices`, each
    with its own password kept in OUT/broker/clients/<user>/password, and confines each
    device to its own topics (`broker_access.FleetAccess`). It listens where `--listen` says;
    without it, where it listened the last time this OUT was served (so a restarted server
    comes back on the same address and its devices reconnect by themselves), else on loopback
    at a free port. Its URL is logged and written to OUT/broker_url. A watchdog starts it again
    if it dies; if that keeps failing, `stop` is set and BrokerError raised on exit."""
    if settings.url is not None:
        yield settings
        return
    host, port = embedded_address(settings, out)
    folder = out / "broker"
    fleet = embedded_fleet(settings, folder / "clients", workers)
    broker = EmbeddedBroker(
        folder, port, persistence=True, host=host, die_with_parent=True, access=fleet.write
    )
    with broker:
        (folder / "listen").write_text(f"{host} {broker.port}\n")
        url = broker.public_url()
        (out / "broker_url").write_text(url + "\n")
        _announce(host, broker.port, url, folder / "clients", fleet)
        watchdog = BrokerWatchdog(broker, lambda _: stop.set() if stop else None).start()
        try:
            yield replace(
                settings,
                url=broker.url,
                username=SERVER_USER,
                password=fleet.passwords[SERVER_USER],
                password_file=None,
            )
        finally:
            watchdog.stop()
    if watchdog.failure is not None:
        raise BrokerError(f"the embedded broker is gone: {watchdog.failure}")


def embedded_fleet(
    settings: BrokerSettings, clients: Path, workers: int
) -> broker_access.FleetAccess:
    """The users of the embedded broker and their passwords (kept in `clients`); raises
    ValueError without devices, or for a device id that is not valid or not free."""
    items = (settings.devices,) if isinstance(settings.devices, str) else settings.devices
    devices = tuple(d.strip() for item in items for d in str(item).split(",") if d.strip())
    if not devices:
        raise ValueError(
            "the embedded broker admits only the devices it is told: give their ids with "
            "--devices pi-1,pi-2 (each one's password is written to "
            f"{clients}/<id>/password), or use a broker of your own with --broker"
        )
    servers = (SERVER_USER, *broker_access.worker_users(SERVER_USER, workers))
    for device in devices:
        check_device_id(device, "device id")
    passwords = broker_access.fleet_passwords(clients, [*servers, *devices])
    return broker_access.FleetAccess(servers, devices, passwords)


def _announce(
    host: str, port: int, url: str, clients: Path, fleet: broker_access.FleetAccess
) -> None:
    """Say where devices connect and where their passwords are (never the passwords)."""
    log.info("broker listening on %s:%d; devices connect with --broker %s", host, port, url)
    log.info(
        "it admits %s, each with --username ID --password-file (a copy of) %s/ID/password",
        ", ".join(fleet.devices),
        clients,
    )
    if len(fleet.servers) > 1:
        log.info(
            "body workers log in as %s with %s/<user>/password",
            ", ".join(fleet.servers[1:]),
            clients,
        )
    if host in ("127.0.0.1", "::1", "localhost"):
        log.info("loopback only: for devices on other machines serve with --listen 0.0.0.0:1883")
    else:
        log.warning(
            "the embedded broker has no TLS: passwords and traffic cross %s:%d in clear; for a "
            "deployment beyond a trusted network use `sfprompt-cloud broker-config`",
            host,
            port,
        )


def embedded_address(settings: BrokerSettings, out: Path) -> tuple[str, int | None]:
    """(host, port) for the embedded broker: --listen, --embedded-port, the last run's, or
    loopback at a free port."""
    if settings.listen is not None:
        return parse_listen(settings.listen)
    if settings.embedded_port is not None:
        return "127.0.0.1", settings.embedded_port
    previous = out / "broker" / "listen"
    if previous.exists():
        try:
            host, port = previous.read_text().split()
            return host, int(port)
        except ValueError:
            log.warning("ignoring %s: not 'HOST PORT'", previous)
    return "127.0.0.1", None


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (main thread only): the loops finish cleanly."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def load_test_set(
    path: Path, model: ServerModel, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The server-side test set, preprocessed once with the device's own transform.

    A set larger than `limit` is cut to a stratified subset seeded with `EVAL_SEED` (indices in
    file order), never to its first images: test sets are often sorted by class. Labels are
    the bundle's, matched by class name (`align_classes`): a class folder the model does not
    know is refused before the first round.
    """
    from sfprompt.data.classes import align_classes
    from sfprompt.data.datasets import load_image_set
    from sfprompt.data.sampling import stratified_subset
    from sfprompt.data.transforms import EvalTransform

    images = load_image_set(path, split="test")
    images = align_classes(images, model.manifest.classes, log.info)
    indices = np.arange(len(images), dtype=np.int64)
    if limit is not None:
        indices = stratified_subset(images.labels, limit, np.random.default_rng(EVAL_SEED))
    transform = EvalTransform.from_config(model.manifest.preprocess)
    return images.preprocessed(indices, transform), images.labels[indices]


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> list[dict]:
    """Run the federation's rounds; returns the metrics history. Raises BundleError,
    CheckpointError, TransportError or TimeoutError (too few devices) with clear messages."""
    stop = stop or stop_on_signals()
    if cfg.rounds.batch_size > cfg.max_batch:  # every SMASHED would be refused too_large
        raise ValueError(
            f"--batch-size {cfg.rounds.batch_size} is above --max-batch {cfg.max_batch}, the "
            "most samples one request may carry: lower it or raise --max-batch"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.source.load(cfg.body)
    manifest = model.manifest
    test = load_test_set(cfg.test_data, model, cfg.eval_samples) if cfg.test_data else None

    def evaluate(params: dict[str, np.ndarray]) -> tuple[float, float] | None:
        if test is None:
            return None
        result = model.evaluate(params, test[0], test[1])
        return result.accuracy, result.loss

    exporter = PrometheusExporter(cfg.metrics_port) if cfg.metrics_port else None
    with broker_url(cfg.broker, out, cfg.body_workers, stop) as broker:
        url = broker.url
        assert url is not None
        topics_cfg = broker.client_config(url, cfg.client_id)
        stopped = ServerStatus(device_id=BROADCAST, state="stopped", text="server gone")
        client_cfg = broker.client_config(
            url,
            cfg.client_id,
            expect=expectations_for(manifest),
            will=(topics_cfg.topics.server_status(), encode(stopped)),
        )
        client = MqttClient(client_cfg)
        store = StepStore(ttl_s=cfg.rounds.round_timeout_s)
        batcher = BodyBatcher(model, cfg.max_batch, cfg.max_wait_ms / 1000).start()
        if cfg.body_workers == 0:
            BodyService(client, batcher, store).attach()
        progress = _RoundProgress(cfg.rounds.rounds, cfg.progress)
        coordinator = Coordinator(
            client,
            cfg.rounds,
            model.initial_parameters(),
            manifest.contract_hash(),
            out / "checkpoint.safetensors",
            MetricsLog(out / "metrics.jsonl"),
            evaluate,
            eval_samples=None if test is None else len(test[1]),
            on_round=lambda m: _after_round(m, progress, exporter, coordinator),
            on_device_gone=store.drop_device,
        ).attach()
        if coordinator.resume():
            progress.resumed(coordinator.round)
        client.connect()
        try:
            with progress:
                coordinator.run(stop)
        finally:
            client.close(send_will=True)
            batcher.stop()
            if exporter is not None:
                exporter.close()
    return coordinator.history


def run_worker(cfg: WorkerConfig, stop: threading.Event | None = None) -> None:
    """Serve the body to this worker's share of the devices until stopped."""
    stop = stop or stop_on_signals()
    if cfg.broker.url is None:
        raise ValueError("a worker needs the broker URL the server uses (--broker)")
    model = cfg.source.load(cfg.body)
    client_cfg = cfg.broker.client_config(
        cfg.broker.url,
        f"sfprompt-worker-{cfg.index}",
        expect=expectations_for(model.manifest),
    )
    client = MqttClient(client_cfg)
    batcher = BodyBatcher(model, cfg.max_batch, cfg.max_wait_ms / 1000).start()
    owns = lambda device_id: worker_of(device_id, cfg.workers) == cfg.index  # noqa: E731
    BodyService(client, batcher, StepStore(cfg.state_ttl_s), owns).attach()
    client.connect()
    log.info("body worker %d of %d serving on %s", cfg.index, cfg.workers, model.device)
    try:
        stop.wait()
    finally:
        client.close()
        batcher.stop()


def _after_round(
    metrics: RoundMetrics,
    progress: _RoundProgress,
    exporter: PrometheusExporter | None,
    coordinator: Coordinator,
) -> None:
    progress.update(metrics)
    if exporter is not None:
        exporter.observe(metrics)
        exporter.set_online(len(coordinator.registry.online()))


class _RoundProgress:
    """A rich progress bar over rounds showing the latest accuracy (quiet when disabled)."""

    def __init__(self, rounds: int, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            disable=not enabled,
        )
        self.task = self.progress.add_task("waiting for devices", total=rounds)

    def resumed(self, done: int) -> None:
        self.progress.update(self.task, completed=done, description=f"resumed after {done}")

    def update(self, m: RoundMetrics) -> None:
        acc = "" if m.accuracy is None else f"accuracy {m.accuracy:.3f} "
        text = (
            f"{acc}round {m.round}: {len(m.accepted)}/{len(m.selected)} devices, {m.seconds:.1f}s"
        )
        self.progress.update(self.task, completed=m.round, description=text)

    def __enter__(self) -> _RoundProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]
