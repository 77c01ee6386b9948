"""What `sfprompt-cloud serve` and `worker` are asked for: one dataclass per concern, whose fields
are the commands' options (sfprompt/options.py). Torch-free, so that `--help`, `broker-config`
and the simulator's config files load without PyTorch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sfprompt.broker_login import BrokerLogin
from sfprompt.export.config import parse_model_args
from sfprompt.options import internal, opt
from sfprompt.protocol.client_config import ClientConfig

from .rounds import DOWN_ENCODINGS, RoundConfig

STATIC_POOL, ELASTIC_POOL = "static", "elastic"
WORKER_POOLS = (STATIC_POOL, ELASTIC_POOL)

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class BodyConfig:
    """How the server runs the body; every field is a flag of `sfprompt-cloud serve`."""

    device: str = field(
        default="auto",
        metadata=opt(
            "Where the body runs; auto takes CUDA if present.",
            pattern=r"auto|cpu|cuda(:\d+)?",
            metavar="auto|cpu|cuda[:N]",
        ),
    )
    bf16: bool = field(default=False, metadata=opt("bfloat16 autocast for the body."))
    threads: int | None = field(default=None, metadata=opt("CPU threads for the body."))
    max_batch: int = field(
        default=256, metadata=opt("Samples per body call when batching across devices.")
    )
    max_wait_ms: float = field(
        default=5.0, metadata=opt("How long a body call waits for other devices' requests.")
    )
    # scaled_dot_product_attention in the body blocks: the server exports no ONNX, so the
    # reason the exporter turns it off does not apply here, and it saves memory and time.
    fused_attention: bool = field(default=True, metadata=internal())

    def resolve_device(self) -> torch.device:
        """The torch device to run on; raises ValueError for an unknown or absent one."""
        import torch  # only once the body is placed: the options load without PyTorch

        name = self.device.strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda" or name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
            return torch.device(name)
        raise ValueError(f"unknown device {self.device!r}: choose auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in; no URL means an embedded Mosquitto."""

    url: str | None = field(
        default=None,
        metadata=opt("mqtt[s]://host:port; default: start an embedded broker.", flag="--broker"),
    )
    login: BrokerLogin = field(default_factory=BrokerLogin)
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
        return self.login.client_config(url, self.login.username or client_id, **options)


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


@dataclass(frozen=True)
class CaptureSettings:
    """Keep the split traffic this process accepts, to audit what a curious server learns."""

    capture_dir: Path | None = field(
        default=None,
        metadata=opt(
            "Write every h and dL/dz the body accepts here, and (serve) each round's prompt + "
            "tail, to this folder (safetensors), so that `sfprompt-audit DIR --bundle ...` can "
            "show what an honest-but-curious server recovers from them: images and labels. It "
            "holds the devices' private data in all but name: audits and tests only.",
            flag="--capture",
            file_okay=False,
            metavar="DIR",
        ),
    )
    capture_limit: int = field(
        default=256,
        metadata=opt("Most files --capture writes (one per split step, one per round's params)."),
    )

    def __post_init__(self) -> None:
        if self.capture_limit < 1:
            raise ValueError(f"--capture-limit must be at least 1, not {self.capture_limit}")


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
        default=0,
        metadata=opt(
            "0: run the body here; N: `sfprompt-cloud worker`s serve it (the embedded broker "
            "admits N worker logins)."
        ),
    )
    worker_pool: str = field(
        default=STATIC_POOL,
        metadata=opt(
            "static: worker i of N serves the devices hashed to it (worker --index/--of); "
            "elastic: workers started with --id join and leave at any time and each round's "
            "devices are assigned to the live ones by capacity.",
            choices=WORKER_POOLS,
        ),
    )
    # elastic pool: a worker over (1 + this) times its share sheds devices at the next round
    rebalance_threshold: float = field(default=0.25, metadata=internal())
    metrics_port: int | None = field(
        default=None, metadata=opt("Serve Prometheus metrics on this port.")
    )
    progress: bool = field(default=True, metadata=opt("A progress bar (--no-progress in logs)."))
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    # with a broker user name, that name is the client id
    client_id: str = field(default="sfprompt-server", metadata=internal())


@dataclass(frozen=True)
class WorkerConfig:
    """Everything `sfprompt-cloud worker` takes (the embedded broker's options aside)."""

    source: ModelSource = field(default_factory=ModelSource)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    body: BodyConfig = field(default_factory=BodyConfig)
    worker_id: str | None = field(
        default=None,
        metadata=opt(
            "Join serve's elastic pool under this name (no --index/--of).",
            flag="--id",
            pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
        ),
    )
    capacity: float = field(
        default=1.0,
        metadata=opt("Elastic pool: this worker's share of devices relative to the others'."),
    )
    index: int = field(default=0, metadata=opt("This worker's number."))
    workers: int = field(
        default=1,
        metadata=opt("How many workers share the devices (serve --body-workers N).", flag="--of"),
    )
    encoding_down: str = field(
        default=RoundConfig.encoding_down,
        metadata=opt(
            "How replies (z and dL/dh) travel: serve's --encoding-down (same: as each request).",
            choices=DOWN_ENCODINGS,
        ),
    )
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    state_ttl_s: float = field(default=600.0, metadata=internal())

    def __post_init__(self) -> None:
        """Refuse flags of both pools at once, or a place outside the static pool."""
        if self.worker_id is not None:
            if (self.index, self.workers) != (0, 1):
                raise ValueError(
                    "--id joins serve's elastic pool; --index/--of place a worker in the static "
                    "one: give one or the other"
                )
            if not (math.isfinite(self.capacity) and self.capacity > 0):
                raise ValueError(f"--capacity must be a finite number > 0, not {self.capacity}")
        elif not 0 <= self.index < self.workers:
            raise ValueError("--index must be in [0, --of)")
