"""`sfprompt-edge start`: a device that joins the federation and serves round after round.

Threads: paho's network thread and the client's dispatcher only file TASKs into a queue and
set flags; all training happens on the caller's thread, which checks for a newer task, the
deadline and SIGTERM between batches. The device keeps nothing on disk, so stopping at any
moment leaves no half-written file; a lost broker is reconnected with backoff by the client.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time

import numpy as np

from sfprompt.data.classes import align_classes
from sfprompt.data.datasets import load_image_set
from sfprompt.data.transforms import EvalTransform
from sfprompt.protocol.client_config import (
    Inbound,
    presence_will,
)
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import (
    BUNDLE_MISMATCH,
    CODES,
    INTERNAL,
    ProtocolError,
    RemoteError,
    TransportError,
)
from sfprompt.protocol.messages import Error, Join, Message, Presence, ServerStatus, Task, Update
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.units import MB

from .config import EdgeConfig
from .defenses import Defense, refuse_a_weaker_defense
from .hardware import hardware_profile, runtime_versions
from .memory import MemoryProfiler
from .optimizer import Sgd
from .phases import LocalData, RoundAborted, self_update, split_train
from .runtime import DeviceRuntime, open_runtime
from .split_link import SplitLink

log = logging.getLogger(__name__)


class DeviceFailure(RuntimeError):
    """The device cannot take part (e.g. its bundle does not fit the server's model)."""


class BrokerRefused(DeviceFailure):
    """The broker refused us for a reason retrying cannot heal (credentials, TLS, host)."""


class EdgeDevice:
    def __init__(self, cfg: EdgeConfig, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.runtime: DeviceRuntime = open_runtime(
            cfg.bundle, cfg.runtime, cfg.threads, self._micro_batch(), cfg.lean
        )
        self.manifest = self.runtime.manifest
        images = load_image_set(cfg.data, split=cfg.data_split, on_skip=log.warning)
        images = align_classes(images, self.manifest.classes, log.info)  # labels by name
        self.data = LocalData(images, EvalTransform.from_config(self.manifest.preprocess))
        self.rng = np.random.default_rng([cfg.seed, _stable_int(cfg.device_id)])
        self.tasks: queue.Queue[Task] = queue.Queue()
        self.rejoin = threading.Event()
        self.server_done = threading.Event()
        self.rounds_done = 0
        self.joins = 0
        self.client: MqttClient | None = None

    def _micro_batch(self) -> int | None:
        if self.cfg.memory_budget_mb is None:
            return self.cfg.micro_batch
        from .memory_budget import choose_micro_batch

        choice = choose_micro_batch(
            self.cfg.bundle,
            self.cfg.runtime,
            32,
            self.cfg.memory_budget_mb,
            self.cfg.threads,
            self.cfg.lean,
        )
        log.info("memory budget %.0f MB: micro-batch %s", self.cfg.memory_budget_mb, choice)
        return int(choice.micro_batch)

    # ---- connection --------------------------------------------------------------------------
    def _new_client(self) -> MqttClient:
        cfg = self.cfg
        client = MqttClient(
            cfg.login.client_config(
                cfg.broker,
                cfg.device_id,
                expect=expectations_for(self.manifest),
                will=presence_will(cfg.device_id),
            )
        )
        topics = client.config.topics
        client.subscribe(topics.device_inbox(cfg.device_id), self._on_inbox)
        client.subscribe(topics.server_status(), self._on_server_status)
        client.on_every_connect(lambda: self._announce(client))
        return client

    def _announce(self, client: MqttClient) -> None:
        """After every (re)connection: presence online; after a reconnection, JOIN again, as
        the broker may be a new one of a restarted server that knows no devices yet (its
        retained "starting" status was published before we were back)."""
        presence = Presence(device_id=self.cfg.device_id, online=True, since=time.time())
        topic = client.config.topics.presence(self.cfg.device_id)
        client.publish(topic, presence, retain=True, timeout=None)
        if client.connects > 1 and self.joins:
            self.rejoin.set()

    def connect(self) -> MqttClient:
        """Connect, retrying transient failures with backoff until connected or stopped;
        raises BrokerRefused for what retrying cannot heal (credentials, TLS, unknown host)."""
        delay = 1.0
        while not self.stop.is_set():
            client = self._new_client()
            try:
                client.connect(timeout=15.0)
                log.info("%s connected to %s", self.cfg.device_id, self.cfg.broker)
                return client
            except TransportError as exc:
                if exc.permanent:
                    raise BrokerRefused(f"cannot use the broker {self.cfg.broker}: {exc}") from exc
                log.warning("broker %s: %s; retrying in %.0fs", self.cfg.broker, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
        raise DeviceFailure("stopped before the broker could be reached")

    def join(self, client: MqttClient) -> None:
        """JOIN until the server accepts; raises DeviceFailure if it refuses our bundle."""
        topics = client.config.topics
        delay = 1.0
        started = time.monotonic()
        while not self.stop.is_set():
            join = Join(
                device_id=self.cfg.device_id,
                bundle_hash=self.manifest.contract_hash(),
                runtime=runtime_versions(self.cfg.runtime),
                hardware=hardware_profile(),
            )
            try:
                client.request(
                    topics.up(self.cfg.device_id, "join"),
                    join,
                    topics.down(self.cfg.device_id, "status"),
                    timeout=10.0,
                )
                again = " again" if self.joins else ""
                self.joins += 1
                log.info("%s joined the federation%s", self.cfg.device_id, again)
                return
            except RemoteError as exc:
                if getattr(exc.error, "code", "") == BUNDLE_MISMATCH:
                    raise DeviceFailure(str(exc)) from exc
                log.warning("join refused: %s; retrying", exc)
            except TransportError:
                waited = time.monotonic() - started
                hint = (
                    f" for {waited:.0f}s: is a server using this broker ({self.cfg.broker})?"
                    if waited > 30
                    else " yet"
                )
                log.info("no server answered the join%s; retrying in %.0fs", hint, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, 30.0)

    # ---- handlers (dispatcher thread) --------------------------------------------------------
    def _on_inbox(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if isinstance(msg, Task):
            self.tasks.put(msg)
        elif isinstance(msg, Error):
            log.warning("server: [%s] %s", msg.code, msg.text)
        return None

    def _on_server_status(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if isinstance(msg, ServerStatus):
            if msg.state == "starting" and self.joins:
                log.info("the server (re)started; joining again")
                self.rejoin.set()  # a (re)started server knows no devices yet
            if msg.state == "stopped" and self.joins:
                log.warning("the server has stopped; waiting for it to come back")
            if msg.state == "finished":
                log.info("the server has finished its %d rounds", msg.round)
                if self.cfg.leave_when_server_stops:
                    self.server_done.set()
        return None

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Serve rounds until stopped, the round limit, or the server's end; returns rounds."""
        client = self.client = self.connect()
        try:
            self.join(client)
            while not self._should_leave():
                if self.rejoin.is_set():
                    self.rejoin.clear()
                    self.join(client)
                task = self._next_task()
                if task is None:
                    continue
                try:
                    self.run_round(client, task)
                    self.rounds_done += 1
                except RoundAborted as exc:
                    log.info("round %d: %s", task.round, exc)
                except (RemoteError, TransportError, ProtocolError) as exc:
                    # A refused, lost or bad reply (an ERROR, a timeout, NaN from a poisoned
                    # model) fails this round only: the next TASK may be fine again.
                    log.warning("round %d failed, waiting for the next: %s", task.round, exc)
                    self._report_failure(client, task, exc)
        finally:
            client.close(send_will=True)
        return self.rounds_done

    def _report_failure(self, client: MqttClient, task: Task, exc: Exception) -> None:
        """Tell the server why this device has no update this round (best effort)."""
        code = getattr(exc, "code", None) or getattr(getattr(exc, "error", None), "code", None)
        error = Error(
            device_id=self.cfg.device_id,
            round=task.round,
            code=code if code in CODES else INTERNAL,
            text=f"round failed on the device: {exc}"[:500],
        )
        try:
            client.publish(
                client.config.topics.up(self.cfg.device_id, "error"), error, timeout=None
            )
        except (TransportError, ProtocolError) as failure:
            log.debug("could not report the failed round: %s", failure)

    def _should_leave(self) -> bool:
        limit = self.cfg.max_rounds
        return (
            self.stop.is_set()
            or self.server_done.is_set()
            or (limit is not None and self.rounds_done >= limit)
        )

    def _next_task(self) -> Task | None:
        """The newest waiting task still before its deadline (older ones are missed rounds)."""
        try:
            task = self.tasks.get(timeout=0.5)
        except queue.Empty:
            return None
        while not self.tasks.empty():
            task = self.tasks.get_nowait()
        if time.time() > task.settings.deadline:
            log.info("round %d missed: its deadline has passed", task.round)
            return None
        return task

    def run_round(self, client: MqttClient, task: Task) -> Update:
        """Self-update, split training, UPDATE; raises RoundAborted or the link's errors."""
        settings = task.settings
        params = {k: np.array(v, dtype=np.float32) for k, v in task.params.items()}

        def should_stop() -> bool:  # asked before every batch of both phases
            if self.stop.is_set() or self.server_done.is_set() or not self.tasks.empty():
                return True  # asked to stop, the federation is over, or a newer task came
            return time.time() > settings.deadline

        def should_stop_slowly() -> bool:  # --step-delay in the local phase, for tests
            if self.cfg.step_delay_s > 0:
                self.stop.wait(self.cfg.step_delay_s)
            return should_stop()

        log.info(
            "round %d started: %d local samples, keeping %.0f%% by EL2N",
            task.round,
            len(self.data),
            100 * settings.keep_ratio,
        )
        defense = Defense.from_settings(settings)
        refuse_a_weaker_defense(defense, self.cfg.defense_floor())
        if defense.active:
            log.info(
                "round %d: defense against a curious server: %s", task.round, defense.describe()
            )
        started = time.monotonic()
        sent0, received0 = client.traffic.snapshot()
        link = SplitLink(
            client,
            self.cfg.device_id,
            task.round,
            settings.encoding,
            self.cfg.request_timeout_s,
            self.cfg.attempts,
            defense=defense,
            tail_delay_s=self.cfg.step_delay_s,
        )
        cfg = self.cfg
        with MemoryProfiler(interval_s=0.02) as profiler:
            with profiler.phase("self_update"):
                local = self_update(
                    self.runtime,
                    params,
                    self.data,
                    settings,
                    Sgd(settings.local_lr, cfg.momentum, cfg.weight_decay),
                    self.rng,
                    should_stop_slowly,
                )
            with profiler.phase("split_train"):
                split = split_train(
                    self.runtime,
                    params,
                    self.data,
                    local.kept,
                    settings,
                    link,
                    Sgd(settings.split_lr, cfg.momentum, cfg.weight_decay),
                    self.rng,
                    should_stop,
                )
        sent1, received1 = client.traffic.snapshot()
        metrics = {
            "local_loss": local.loss,
            "split_loss": split.loss,
            "kept": float(len(local.kept)),
            "local_samples": float(len(self.data)),
            "split_steps": float(split.steps),
            "bytes_up_split": _delta(sent0, sent1, "smashed", "grad_z"),
            "bytes_down_split": _delta(received0, received1, "body_out", "grad_h"),
        }
        metrics = {k: v for k, v in metrics.items() if np.isfinite(v)}
        memory = {"peak_rss_mb": profiler.profile.peak_rss_mb}
        for name, stats in profiler.profile.phases.items():
            memory[f"{name}_peak_rss_mb"] = stats.peak_rss_mb
            memory[f"{name}_uss_mb"] = stats.uss_mb
            memory[f"{name}_cpu_s"] = stats.cpu_seconds
            memory[f"{name}_s"] = stats.seconds
        update = Update(
            device_id=cfg.device_id,
            round=task.round,
            params=params,
            samples=max(1, len(local.kept)),
            metrics=metrics,
            memory=memory,
        )
        packets = client.packets(update)
        client.publish_packets(client.config.topics.up(cfg.device_id, "update"), packets)
        log.info(
            "round %d done in %.1fs: kept %d/%d, local loss %.4f, split loss %.4f, "
            "%.2f MB up / %.2f MB down, peak RSS %.0f MiB",
            task.round,
            time.monotonic() - started,
            len(local.kept),
            len(self.data),
            local.loss,
            split.loss,
            metrics.get("bytes_up_split", 0.0) / MB,
            metrics.get("bytes_down_split", 0.0) / MB,
            memory["peak_rss_mb"],
        )
        return update


def _delta(before: dict[str, int], after: dict[str, int], *kinds: str) -> float:
    return float(sum(after.get(k, 0) - before.get(k, 0) for k in kinds))


def _stable_int(text: str) -> int:
    """A seed from the device id, the same on every run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def run_device(cfg: EdgeConfig, stop: threading.Event | None = None) -> int:
    return EdgeDevice(cfg, stop).run()
