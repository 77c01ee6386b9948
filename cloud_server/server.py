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
from dataclasses import replace
from pathlib import Path

import numpy as np

from sfprompt.export.config import ExportConfig
from sfprompt.protocol.codec import encode, expectations_for
from sfprompt.protocol.messages import BROADCAST, ServerStatus
from sfprompt.protocol.mqtt_client import MqttClient

from .batcher import BodyBatcher
from .body_model import ServerModel
from .body_service import BodyService, worker_of
from .config import (
    ELASTIC_POOL,
    BodyConfig,
    BrokerSettings,
    CaptureSettings,
    ModelSource,
    ServeConfig,
    WorkerConfig,
)
from .coordinator import Coordinator
from .embedded_broker import SERVER_USER, embedded_broker
from .evaluation import evaluate, load_test_set
from .metrics import MetricsLog, PrometheusExporter, RoundMetrics
from .pool_member import PoolMember, member_session
from .progress import RoundProgress
from .rounds import BUFFERED
from .step_state import StepStore
from .traffic_capture import TrafficCapture
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)


def load_model(source: ModelSource, body: BodyConfig) -> ServerModel:
    """The body to serve: from a server bundle, or a timm model cut as the exporter cuts it."""
    if source.bundle is not None:
        return ServerModel.from_bundle(source.bundle, body)
    if source.model is None:
        raise ValueError("give a server bundle (--bundle) or a timm model name (--model)")
    export = ExportConfig(
        model=source.model,
        num_classes=source.num_classes,
        pretrained=source.pretrained,
        checkpoint=source.weights,
        model_args=dict(source.model_args),
        prompts=source.prompts,
        head_blocks=source.head_blocks,
        tail_blocks=source.tail_blocks,
        seed=source.seed,
    )
    return ServerModel.from_timm(export, body)


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
        login = replace(settings.login, username=SERVER_USER, password=password, password_file=None)
        yield replace(settings, url=url, login=login)


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
    _check_pool(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.source, cfg.body)
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
        capture = start_capture(cfg.capture, manifest.contract_hash())
        batcher = None  # with body workers, they run the body, not this process
        if cfg.body_workers == 0:
            batcher = BodyBatcher(model, cfg.body.max_batch, cfg.body.max_wait_ms / 1000).start()
            down = cfg.rounds.encoding_down
            BodyService(client, batcher, store, encoding_down=down, capture=capture).attach()
        pool = None
        if cfg.worker_pool == ELASTIC_POOL:
            pool = WorkerPool(client, cfg.rebalance_threshold).attach()
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
            pool=pool,
            on_task=capture.round_params if capture is not None else lambda *_: None,
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
            if capture is not None:
                capture.close()
            if exporter is not None:
                exporter.close()
    return coordinator.history


def start_capture(settings: CaptureSettings, contract_hash: str) -> TrafficCapture | None:
    """The traffic capture `--capture DIR` asks for, started (None without it)."""
    if settings.capture_dir is None:
        return None
    return TrafficCapture(Path(settings.capture_dir), settings.capture_limit, contract_hash).start()


def _check_pool(cfg: ServeConfig) -> None:
    """Refuse what an elastic pool cannot do (yet) with a message that says so."""
    if cfg.worker_pool != ELASTIC_POOL:
        return
    if cfg.rounds.aggregation_mode == BUFFERED:
        raise ValueError(
            "--worker-pool elastic runs synchronous rounds only: drop --aggregation-mode buffered"
        )
    if cfg.broker.url is None and cfg.body_workers < 1:
        raise ValueError(
            "--worker-pool elastic with the embedded broker needs --body-workers N >= 1, the "
            "worker logins it admits (server-worker-0 .. N-1)"
        )


def run_worker(cfg: WorkerConfig, stop: threading.Event | None = None) -> None:
    """Serve the body to this worker's share of the devices until stopped: the devices hashed
    to `--index` of `--of`, or with `--id` those serve's elastic pool assigns it."""
    stop = stop or stop_on_signals()
    if cfg.broker.url is None:
        raise ValueError("a worker needs the broker URL the server uses (--broker)")
    model = load_model(cfg.source, cfg.body)
    name = cfg.worker_id if cfg.worker_id is not None else str(cfg.index)
    client_cfg = cfg.broker.client_config(
        cfg.broker.url, f"sfprompt-worker-{name}", expect=expectations_for(model.manifest)
    )
    if cfg.worker_id is not None:
        client_cfg = member_session(client_cfg, cfg.worker_id)
    client = MqttClient(client_cfg)
    batcher = BodyBatcher(model, cfg.body.max_batch, cfg.body.max_wait_ms / 1000).start()
    store = StepStore(cfg.state_ttl_s)
    capture = start_capture(cfg.capture, model.manifest.contract_hash())
    if cfg.worker_id is not None:
        service = BodyService(
            client, batcher, store, encoding_down=cfg.encoding_down, capture=capture
        )
        member = PoolMember(client, service, cfg.worker_id, cfg.capacity, model.device.type)
        service.owns = member.owns
        member.attach()
        where = f"worker {cfg.worker_id} (elastic pool, capacity {cfg.capacity:g})"
    else:
        owns = lambda device_id: worker_of(device_id, cfg.workers) == cfg.index  # noqa: E731
        service = BodyService(client, batcher, store, owns, cfg.encoding_down, capture).attach()
        where = f"body worker {cfg.index} of {cfg.workers}"
    client.connect()
    log.info("%s serving on %s", where, model.device)
    try:
        stop.wait()
    finally:
        client.close()
        batcher.stop()
        if capture is not None:
            capture.close()
        received = ", ".join(f"{d} {n}" for d, n in sorted(service.received.items()))
        log.info("split messages received: %s", received or "none")


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
