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
from typing import Any

import numpy as np

from sfprompt.export.model_loading import parse_model_args
from sfprompt.options import internal, opt
from sfprompt.protocol.client_config import ClientConfig, connection_config, read_password
from sfprompt.protocol.codec import encode, expectations_for
from sfprompt.protocol.messages import BROADCAST, ServerStatus
from sfprompt.protocol.mqtt_client import MqttClient

from .batcher import BodyBatcher
from .body_model import BodyConfig, ServerModel
from .body_service import BodyService, worker_of
from .coordinator import Coordinator
from .embedded_broker import SERVER_USER, embedded_broker
from .evaluation import evaluate, load_test_set
from .metrics import MetricsLog, PrometheusExporter, RoundMetrics
from .progress import RoundProgress
from .rounds import RoundConfig
from .step_state import StepStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in; no URL means an embedded Mosquitto."""

    url: str | None = field(
        default=None,
        metadata=opt("mqtt[s]://host:port; default: start an embedded broker.", flag="--broker"),
    )
    username: str | None = field(default=None, metadata=opt("Broker user name."))
    password: str | None = field(
        default=None,
        metadata=opt(
            "Broker password; prefer --password-file or the variable (`ps` shows flags).",
            envvar="SFPROMPT_BROKER_PASSWORD",
        ),
    )
    password_file: Path | None = field(
        default=None,
        metadata=opt(
            "File whose first line is the broker password (clients/server/password).",
            exists=True,
            dir_okay=False,
        ),
    )
    tls_ca: str | None = field(
        default=None, metadata=opt("CA certificate of the broker (switches TLS on).")
    )
    tls_cert: str | None = field(default=None, metadata=opt("Client certificate."))
    tls_key: str | None = field(default=None, metadata=opt("Client key."))
    listen: str | None = field(
        default=None,
        metadata=opt(
            "Where the embedded broker listens: 0.0.0.0:1883 for devices on other machines "
            "(no TLS: a trusted network only). Default: where it listened the last time OUT "
            "was served, else 127.0.0.1 at a free port. A port already taken is refused.",
            metavar="HOST:PORT",
        ),
    )
    devices: tuple[str, ...] = field(
        default=(),
        metadata=opt(
            "Devices the embedded broker admits (`a,b` or repeated); each one's password is in "
            "OUT/broker/clients/ID/password.",
            metavar="ID,...",
        ),
    )
    embedded_port: int | None = field(
        default=None, metadata=opt("Port of the embedded broker on 127.0.0.1 (see --listen).")
    )

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

    bundle: Path | None = field(
        default=None,
        metadata=opt(
            "Server bundle folder (sfprompt-export bundle ... /server).",
            exists=True,
            file_okay=False,
        ),
    )
    model: str | None = field(
        default=None, metadata=opt("Or a timm model name, cut as the exporter cuts it.")
    )
    num_classes: int = field(default=10, metadata=opt("Classes of the task (--model)."))
    prompts: int = field(default=10, metadata=opt("Learnable prompt tokens (--model)."))
    head_blocks: int = field(default=1, metadata=opt("Blocks on the device before the body."))
    tail_blocks: int = field(default=0, metadata=opt("Blocks on the device after the body."))
    pretrained: bool = field(default=False, metadata=opt("timm pre-trained weights (--model)."))
    weights: Path | None = field(
        default=None, metadata=opt("A local checkpoint for --model.", exists=True)
    )
    model_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=opt(
            "timm override for --model, repeatable: --model-arg img_size=32.",
            flag="--model-arg",
            metavar="KEY=VALUE",
            convert=parse_model_args,
        ),
    )
    seed: int = field(default=0, metadata=internal())  # of the prompt of a --model cut

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
    """Everything `sfprompt-cloud serve` takes; `--config FILE` fills the same fields."""

    source: ModelSource = field(default_factory=ModelSource)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    body: BodyConfig = field(default_factory=BodyConfig)
    out: Path = field(
        default=Path("runs/server"),
        metadata=opt("Checkpoint, metrics.jsonl and the embedded broker's files.", file_okay=False),
    )
    test_data: Path | None = field(
        default=None,
        metadata=opt(
            "Server-side test set (ImageFolder, CIFAR binary, .npz), evaluated per round.",
            exists=True,
        ),
    )
    eval_samples: int | None = field(
        default=2000, metadata=opt("Test images evaluated per round (a fixed stratified subset).")
    )
    body_workers: int = field(
        default=0, metadata=opt("0: run the body here; N: N `sfprompt-cloud worker`s serve it.")
    )
    metrics_port: int | None = field(
        default=None, metadata=opt("Serve Prometheus metrics on this port.")
    )
    progress: bool = field(default=True, metadata=opt("A progress bar (--no-progress in logs)."))
    # with a broker user name, that name is the client id
    client_id: str = field(default="sfprompt-server", metadata=internal())


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `sfprompt-cloud worker` takes (the embedded broker's options aside)."""

    source: ModelSource = field(default_factory=ModelSource)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    body: BodyConfig = field(default_factory=BodyConfig)
    index: int = field(default=0, metadata=opt("This worker's number."))
    workers: int = field(
        default=1,
        metadata=opt("How many workers share the devices (serve --body-workers N).", flag="--of"),
    )
    state_ttl_s: float = field(default=600.0, metadata=internal())


@contextmanager
def broker_url(
    settings: BrokerSettings,
    out: Path,
    workers: int = 0,
    stop: threading.Event | None = None,
) -> Iterator[BrokerSettings]:
    """The broker to use, as settings with its URL and this server's login: the given URL, or
    an embedded Mosquitto (`embedded_broker`) that admits the server, its `workers` and
    `settings.devices`, and ends with this process."""
    if settings.url is not None:
        yield settings
        return
    with embedded_broker(
        settings.devices, settings.listen, settings.embedded_port, out, workers, stop
    ) as (url, password):
        yield replace(
            settings, url=url, username=SERVER_USER, password=password, password_file=None
        )


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (main thread only): the loops finish cleanly."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(cfg: ServeConfig, stop: threading.Event | None = None) -> list[dict]:
    """Run the federation's rounds; returns the metrics history. Raises BundleError,
    CheckpointError, TransportError or TimeoutError (too few devices) with clear messages."""
    stop = stop or stop_on_signals()
    if cfg.rounds.batch_size > cfg.body.max_batch:  # every SMASHED would be refused too_large
        raise ValueError(
            f"--batch-size {cfg.rounds.batch_size} is above --max-batch {cfg.body.max_batch}, the "
            "most samples one request may carry: lower it or raise --max-batch"
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.source.load(cfg.body)
    manifest = model.manifest
    test = load_test_set(cfg.test_data, model, cfg.eval_samples) if cfg.test_data else None

    def evaluate_round(params: dict[str, np.ndarray]) -> tuple[float, float] | None:
        if test is None:
            return None
        result = evaluate(model, params, test[0], test[1])
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
        batcher = None  # with body workers, they run the body, not this process
        if cfg.body_workers == 0:
            batcher = BodyBatcher(model, cfg.body.max_batch, cfg.body.max_wait_ms / 1000).start()
            BodyService(client, batcher, store).attach()
        progress = RoundProgress(cfg.rounds.rounds, cfg.progress)
        coordinator = Coordinator(
            client,
            cfg.rounds,
            model.initial_parameters(),
            manifest.contract_hash(),
            out / "checkpoint.safetensors",
            MetricsLog(out / "metrics.jsonl"),
            evaluate_round,
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
            if batcher is not None:
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
    batcher = BodyBatcher(model, cfg.body.max_batch, cfg.body.max_wait_ms / 1000).start()
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
    progress: RoundProgress,
    exporter: PrometheusExporter | None,
    coordinator: Coordinator,
) -> None:
    progress.update(metrics)
    if exporter is not None:
        exporter.observe(metrics)
        exporter.set_online(len(coordinator.registry.online()))
