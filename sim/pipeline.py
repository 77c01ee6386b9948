"""`sfprompt-sim`: data -> model -> bundles -> partition -> every method -> report.

Split methods run as real federations (sim/run_split.py); the FL baselines and SFL run
in-process (sim/baselines.py) on the same shards, seed and round budget. One function per
stage, so that each can be read (and replaced) on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sfprompt.cloud_server.rounds import SAME_ENCODING, RoundConfig
from sfprompt.export.bundle_writer import ExportResult, export_bundle
from sfprompt.export.config import ExportConfig
from sfprompt.export.split_vit import Cut

from .comparison import SeedRun
from .config import SimConfig
from .device_memory import ModelSpec
from .encodings import EncodingRow, EncodingRun, Setting, sweep_settings
from .results import SPLIT_METHODS, Features, MethodResult

Progress = Callable[[str], None]


@dataclass
class SimOutcome:
    primary: list[MethodResult]  # the first partition's first seed (the detailed report)
    runs: list[SeedRun]  # every partition and seed at the first client count
    ceilings: list  # sim/ceilings.Ceiling
    report_dir: Path
    encodings: list[EncodingRow] = field(default_factory=list)  # with --encodings
    audit: list = field(default_factory=list)  # sim/audit.AuditRow, with --audit


def run_simulation(cfg: SimConfig, say: Progress = print) -> SimOutcome:
    """Every method over `cfg.seeds` seeds in every partition, the ceilings, the encodings sweep
    (every partition and seed), the clients sweep (first partition and seed), then the report."""
    from . import baselines, comparison, datasets, partition, report
    from .run_baseline import run_baseline
    from .run_split import CostModel, method_settings, run_split_method

    out = Path(cfg.out)
    model_name, model_args, checkpoint = prepare_model(cfg, say)
    size = int(model_args.get("img_size", 224))
    data = datasets.load_sim_data(
        cfg.data, cfg.root, size, cfg.download, cfg.max_train, cfg.max_test, cfg.seed
    )
    say(f"data: {data.name}, {len(data.train_labels)} training and {len(data.test_labels)} "
        f"test images, {data.num_classes} classes")  # fmt: skip
    bundles = export_bundles(cfg, model_name, model_args, checkpoint, data.classes, out, say)
    first = next(iter(bundles.values()))
    preprocess = first.device.preprocess

    build_model = ModelSpec(model_name, data.num_classes, cfg.pretrained, checkpoint, model_args)

    cut = Cut(cfg.head_blocks, cfg.tail_blocks, cfg.prompts)
    cost = CostModel(build_model(), cut, cfg)  # type: ignore[arg-type]
    base = RoundConfig(
        rounds=cfg.rounds,
        keep_ratio=cfg.keep_ratio,
        prune=cfg.prune,
        local_epochs=cfg.local_epochs,
        local_lr=cfg.local_lr,
        split_lr=cfg.split_lr,
        batch_size=cfg.batch_size,
        server_lr=cfg.server_lr,
        seed=cfg.seed,
        defense_clip=cfg.defense_clip,
        defense_noise=cfg.defense_noise,
        defense_grad_noise=cfg.defense_grad_noise,
        defense_grad_max_norm=cfg.defense_grad_max_norm,
    )
    baseline_cfg = baselines.BaselineConfig(
        rounds=cfg.rounds,
        lr=cfg.baseline_lr,
        batch_size=cfg.batch_size,
        server_lr=cfg.server_lr,
        seed=cfg.seed,
        uplink_mbps=cfg.uplink_mbps,
        downlink_mbps=cfg.downlink_mbps,
        device_gflops=cfg.device_gflops,
        server_gflops=cfg.server_gflops,
    )
    test_pair = (data.test_images, data.test_labels)
    primary_run: list[SeedRun] = []
    sweep: dict[int, list[MethodResult]] = {}
    features: list[Features] = []
    peaks: dict[str, float] = {}  # a torch device's peak RSS, measured once per method
    encoding_runs: list[EncodingRun] = []
    settings_swept = sweep_settings(cfg.encodings) if cfg.encodings else []
    main = Setting(base.encoding, base.down_encoding)  # how the comparison's sfprompt runs

    def run_split(  # noqa: ANN202
        method: str, rounds: RoundConfig, shards: list[Path], test: Path, run_dir: Path
    ):
        """One split federation: (its bundle, its result)."""
        bundle = bundles["linear" if method == "sfl_linear" else "prompt"]
        result = run_split_method(
            method, bundle.server_dir, bundle.device_dir, shards, test, rounds, cost, run_dir,
            lambda done, acc: say(f"  {method} round {done}: accuracy {acc:.3f}"),
        )  # fmt: skip
        return bundle, result

    def run_methods(
        clients: int, spec: str, seed: int, sweep_encodings: bool = False
    ) -> list[MethodResult]:
        """Every method on one partition of the training data, all from one seed; with
        `sweep_encodings`, SFPrompt in every setting of the encodings sweep too."""
        where = f"clients{clients}/{spec.replace(':', '')}/seed{seed}"
        parts = partition.partition_for(spec, data.train_labels, clients, cfg.alpha, seed)
        shard_paths, test_path = partition.write_shards(data, parts, out / "data" / where)
        shards = [(data.train_images[p], data.train_labels[p]) for p in parts]
        first = not sweep and not primary_run
        results = []
        for method in cfg.methods:
            say(f"[{clients} clients, {spec}, seed {seed}] {method}: {cfg.rounds} rounds")
            if method in SPLIT_METHODS and method != "sfl":
                run_dir = out / "runs" / where / method
                rounds = replace(method_settings(method, base), seed=seed)
                bundle, result = run_split(method, rounds, shard_paths, test_path, run_dir)
                if first and method in ("sfprompt", "sfl_linear"):
                    features.append(split_features(method, bundle, run_dir, data))
            else:
                result, feats = run_baseline(
                    method, build_model, preprocess, shards, test_pair,
                    replace(baseline_cfg, seed=seed),
                    cut if method != "sfl" else replace(cut, prompts=0), progress=say,
                    known_peak_mb=peaks.get(method),
                )  # fmt: skip
                peaks.setdefault(method, result.rounds[0].device_peak_mb)
                if feats is not None and first:
                    features.append(feats)
            say(f"  {result.label}: final accuracy {result.final_accuracy:.3f}")
            results.append(result)
        for setting in settings_swept if sweep_encodings else []:
            done = next((r for r in results if r.method == "sfprompt"), None)
            if setting != main or done is None:  # the comparison's run serves its own setting
                say(f"[{clients} clients, {spec}, seed {seed}] sfprompt in {setting.name}")
                rounds = encoding_settings(replace(base, seed=seed), setting)
                run_dir = out / "runs" / where / f"sfprompt_{setting.name.replace('/', '-')}"
                done = run_split("sfprompt", rounds, shard_paths, test_path, run_dir)[1]
                say(f"  {setting.name}: final accuracy {done.final_accuracy:.3f}")
            encoding_runs.append(EncodingRun(setting.name, spec, seed, done))
        return results

    specs = [f"dirichlet:{cfg.alpha:g}" if p == "dirichlet" else p for p in cfg.partitions]
    for spec in specs:  # the comparison: every partition, every seed
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            results = run_methods(cfg.clients[0], spec, seed, sweep_encodings=True)
            primary_run.append(SeedRun(spec, seed, results))
    sweep[cfg.clients[0]] = primary_run[0].results
    for clients in cfg.clients[1:]:  # the clients sweep: the first partition, the first seed
        sweep[clients] = run_methods(clients, specs[0], cfg.seed)
    ceilings = run_ceilings(cfg, build_model, preprocess, data, cut, say)
    features.insert(0, baselines.untuned_features(build_model, preprocess, test_pair, cut))
    primary = primary_run[0].results
    settings = {k: str(v) for k, v in asdict(cfg).items()}
    audit_rows, audit_section, audit_files = [], "", []
    if cfg.audit:  # what a curious server learns from SFPrompt's traffic, per defense
        from .audit import audit_simulation
        from .audit_report import markdown, write_audit

        labels = data.train_labels
        parts = partition.partition_for(
            cfg.partitions[0], labels, cfg.clients[0], cfg.alpha, cfg.seed
        )
        server_dir = bundles["prompt"].server_dir
        audit = audit_simulation(cfg, data, server_dir, base, run_split, parts, out, say)
        audit_rows, audit_section = audit.rows, markdown(audit, level=2)
        audit_files = write_audit(out / "report", audit)
    written = report.write_report(
        out / "report", primary, features, sweep if len(cfg.clients) > 1 else None, settings,
        sections=[audit_section] if audit_section else [], extra_files=audit_files,
    )  # fmt: skip
    folder = Path(written.files[0]).parent if written.files else out / "report"
    rows, section = report_encodings(folder, encoding_runs, settings_swept, say)
    comparison.write_comparison(folder, primary_run, ceilings, settings, section)
    return SimOutcome(primary, primary_run, ceilings, folder, rows, audit_rows)


def encoding_settings(rounds: RoundConfig, setting: Setting) -> RoundConfig:
    """SFPrompt's round settings with activations up in `setting.up`, replies in `setting.down`
    (left at "same" when they agree, as a user would run serve)."""
    down = SAME_ENCODING if setting.down == setting.up else setting.down
    return replace(rounds, encoding=setting.up, encoding_down=down)


def report_encodings(
    folder: Path, runs: list[EncodingRun], settings: list[Setting], say: Progress
) -> tuple[list[EncodingRow], str]:
    """The encodings table and its Markdown section (none without a sweep), with each
    setting's bytes at ViT-Base scale, written as encodings.md / .json / .csv."""
    from . import encodings
    from .paper_scale import PaperScale, PaperScaleModel

    if not runs:
        return [], ""
    scale = PaperScale()
    say(f"counting bytes at the paper's scale: {scale.describe()}")
    model = PaperScaleModel(scale)
    vit_base = {}
    for setting in settings:
        counted = model.round_bytes(setting.up, setting.down)
        vit_base[setting.name] = (float(counted.sfprompt.total), counted.vs_fl_full)
    rows = encodings.encoding_rows(runs, vit_base)
    encodings.write_encodings(folder, rows, runs, scale.describe())
    return rows, encodings.markdown(rows, scale.describe())


def run_ceilings(cfg: SimConfig, spec: ModelSpec, preprocess: dict, data, cut: Cut, say: Progress):  # noqa: ANN001, ANN201
    """The centralised ceilings on all the federation's training data (none with --no-ceilings)."""
    from .ceilings import CEILINGS, CeilingConfig, run_ceiling

    if not cfg.ceilings:
        return []
    ceiling_cfg = CeilingConfig(epochs=cfg.ceiling_epochs, batch_size=cfg.batch_size, seed=cfg.seed)
    train, test = (data.train_images, data.train_labels), (data.test_images, data.test_labels)
    out = []
    for kind in CEILINGS:
        ceiling = run_ceiling(kind, spec, preprocess, train, test, cut, ceiling_cfg)
        say(f"ceiling {ceiling.label}: {100 * ceiling.accuracy:.1f}% ({ceiling.seconds:.0f} s)")
        out.append(ceiling)
    return out


def prepare_model(cfg: SimConfig, say: Progress) -> tuple[str, dict[str, Any], Path | None]:
    """The model to fine-tune: a timm name (pre-trained or from a checkpoint), or offline the
    small ViT pre-trained on classes 5-9 of Fashion-MNIST (or of the digits; for any other data
    set the digits ViT), with a fresh classifier for the federation's classes."""
    if cfg.model is not None:
        return cfg.model, dict(cfg.model_args), cfg.checkpoint
    from .pretrain import DEFAULT_MODEL, MODEL_ARGS, fresh_head_checkpoint, pretrained_vit

    source = cfg.data if cfg.data in MODEL_ARGS else "digits"
    args = {**MODEL_ARGS[source], **cfg.model_args}
    path = pretrained_vit(
        cfg.cache, source, DEFAULT_MODEL, args, cfg.pretrain_epochs, cfg.seed, say, cfg.root
    )
    return DEFAULT_MODEL, args, fresh_head_checkpoint(path, cfg.seed, cfg.cache)


def export_bundles(
    cfg: SimConfig,
    model: str,
    model_args: dict[str, Any],
    checkpoint: Path | None,
    classes: list[str],
    out: Path,
    say: Progress,
) -> dict[str, ExportResult]:
    """The prompted bundle (SFPrompt and its ablations) and, for SFL+Linear, one without prompts.

    The bundles name the data's classes, to which devices match their shards by name, and say
    crop_pct 1.0: `load_sim_data` has already framed every image at the model's size, so the
    eval transform must not enlarge and crop it again (the pre-training saw whole images too).
    """
    prompted = cfg.encodings or any(m.startswith("sfprompt") for m in cfg.methods)
    wanted = {"prompt": cfg.prompts} if prompted else {}
    if "sfl_linear" in cfg.methods or not wanted:
        wanted["linear"] = 0
    bundles = {}
    for name, prompts in wanted.items():
        say(f"exporting the {name} bundle ({prompts} prompts)")
        export = ExportConfig(
            model=model,
            num_classes=len(classes),
            classes=list(classes),
            pretrained=cfg.pretrained,
            checkpoint=checkpoint,
            model_args=framed(model_args),
            prompts=prompts,
            head_blocks=cfg.head_blocks,
            tail_blocks=cfg.tail_blocks,
            head_weights=cfg.head_weights,
            batch=cfg.batch_size,
            seed=cfg.seed,
            out=out / "bundles" / name,
        )
        bundles[name] = export_bundle(export, progress=lambda _: None)
    return bundles


def framed(model_args: dict[str, Any]) -> dict[str, Any]:
    """`model_args` with timm's `pretrained_cfg_overlay` saying crop_pct 1.0, so a bundle's
    preprocessing leaves images already at the model's size as they are."""
    overlay = {**model_args.get("pretrained_cfg_overlay", {}), "crop_pct": 1.0}
    return {**model_args, "pretrained_cfg_overlay": overlay}


def split_features(method: str, bundle: ExportResult, run_dir: Path, data) -> Features:  # noqa: ANN001
    """What the tail reads under the method's final global prompt, on up to 500 test images."""
    from sfprompt.cloud_server.body_model import ServerModel
    from sfprompt.cloud_server.checkpoint import load_checkpoint
    from sfprompt.cloud_server.evaluation import features
    from sfprompt.data.transforms import EvalTransform

    ckpt = load_checkpoint(run_dir / "server/checkpoint.safetensors")
    assert ckpt is not None, "a finished run has a checkpoint"
    model = ServerModel.from_bundle(bundle.server_dir)
    images = data.test_images[:500]
    x = EvalTransform.from_config(bundle.device.preprocess).from_uint8(images)
    feats = features(model, ckpt.params, x)
    return Features(method, feats.reshape(len(feats), -1), data.test_labels[:500])
