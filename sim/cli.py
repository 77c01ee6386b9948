"""`sfprompt-sim`: a whole federation on one machine, compared with the baselines, reported."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.config_file import merge_config

from .results import METHODS

# Wide enough for the summary table when the output goes to a log rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 180)


def _csv(kind: type) -> click.ParamType:
    class Csv(click.ParamType):
        name = f"{kind.__name__},..."

        def convert(self, value: Any, param: Any, ctx: Any) -> tuple:
            if isinstance(value, (list, tuple)):
                return tuple(kind(v) for v in value)
            try:
                return tuple(kind(v) for v in str(value).split(",") if v.strip())
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of {kind.__name__}", param, ctx)

    return Csv()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    default="fashion-mnist",
    show_default=True,
    help="fashion-mnist (offline: classes 0-4 federated, the model pre-trained on 5-9), "
    "digits (the same split of sklearn's digits, seconds-long), cifar10, cifar100, svhn, "
    "flowers102, caltech101, food101, mnist, kmnist, fashionmnist (torchvision), or an "
    "ImageFolder path.",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    help="Where the data set's files are (fashion-mnist: /usr/share/datasets/fashion-mnist).",
)
@click.option("--download", is_flag=True, help="Download a torchvision data set if missing.")
@click.option(
    "--max-train",
    type=int,
    default=1800,
    show_default=True,
    help="Federate at most this many training images (a stratified subset; 0: all).",
)
@click.option(
    "--max-test",
    type=int,
    default=2000,
    show_default=True,
    help="Evaluate on at most this many test images (a stratified subset; 0: all).",
)
@click.option("--model", help="A timm ViT name (default: the small digits ViT, pre-trained here).")
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="timm overrides, e.g. img_size=32 (repeatable).",
)
@click.option("--pretrained", is_flag=True, help="timm's pre-trained weights for --model.")
@click.option(
    "--checkpoint", type=click.Path(exists=True, path_type=Path), help="Local weights for --model."
)
@click.option(
    "--clients",
    type=_csv(int),
    default="5",
    show_default=True,
    help="Devices; several (5,10,20,50) run a clients-count sweep.",
)
@click.option("--rounds", type=int, default=5, show_default=True)
@click.option(
    "--partitions",
    type=_csv(str),
    default="iid,dirichlet",
    show_default=True,
    help="How labels spread over devices: iid, dirichlet (at --alpha) or dirichlet:ALPHA; "
    "each is a column of the comparison.",
)
@click.option(
    "--alpha",
    type=float,
    default=0.1,
    show_default=True,
    help="Dirichlet concentration (smaller: more skewed), as in the paper.",
)
@click.option(
    "--seeds",
    type=int,
    default=3,
    show_default=True,
    help="Runs of every method per partition (seeds --seed, --seed + 1, ...): mean ± std.",
)
@click.option(
    "--ceilings/--no-ceilings",
    default=True,
    show_default=True,
    help="Centralised linear probe, prompt + tail and full fine-tuning on the same backbone.",
)
@click.option("--ceiling-epochs", type=int, default=5, show_default=True)
@click.option(
    "--methods",
    type=_csv(str),
    default="sfprompt,sfl_linear,fl_full",
    show_default=True,
    help=f"Any of: {', '.join(METHODS)}.",
)
@click.option("--prompts", type=int, default=10, show_default=True)
@click.option("--head-blocks", type=int, default=1, show_default=True)
@click.option("--tail-blocks", type=int, default=0, show_default=True)
@click.option(
    "--keep-ratio",
    type=float,
    default=0.5,
    show_default=True,
    help="gamma: fraction each device keeps by EL2N pruning.",
)
@click.option(
    "--prune",
    type=click.Choice(["class", "global"]),
    default="class",
    show_default=True,
    help="EL2N keeps the hardest gamma of each class, or of each device's whole set (the "
    "paper's rule; the sfprompt_global_prune method runs it beside).",
)
@click.option("--local-epochs", type=int, default=1, show_default=True)
@click.option(
    "--local-lr",
    type=float,
    default=RoundConfig.local_lr,
    show_default=True,
    help="Local-loss phase (the paper: 1e-4); the same default as sfprompt-cloud serve.",
)
@click.option(
    "--split-lr",
    type=float,
    default=RoundConfig.split_lr,
    show_default=True,
    help="Split-training phase; the same default as sfprompt-cloud serve.",
)
@click.option(
    "--baseline-lr",
    type=float,
    default=0.01,
    show_default=True,
    help="SGD (momentum 0.9) learning rate of FL and SFL.",
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--server-lr", type=float, default=1.0, show_default=True)
@click.option(
    "--uplink",
    "uplink_mbps",
    type=float,
    default=12.0,
    show_default=True,
    help="Mbps, for the round-time estimate (the paper's appendix Table 1).",
)
@click.option("--downlink", "downlink_mbps", type=float, default=54.0, show_default=True)
@click.option("--device-gflops", type=float, default=10.0, show_default=True)
@click.option("--server-gflops", type=float, default=10000.0, show_default=True)
@click.option(
    "--pretrain-epochs",
    type=int,
    help="Pre-training epochs of the default backbone (default: the shipped one's).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default="runs/sim", show_default=True)
@click.option(
    "--cache",
    type=click.Path(path_type=Path),
    default=str(Path.home() / ".cache/sfprompt"),
    show_default=True,
    help="Where the pre-trained digits ViT is kept.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, path_type=Path),
    help="JSON or TOML file of these options (flags given here win).",
)
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, **flags: Any) -> None:
    """Run a whole federation on this machine and compare SFPrompt with the baselines.

    Starts an embedded Mosquitto, the cloud server and one device process per client (real
    processes, real MQTT, real bundles) for the split methods; runs the FL baselines on the
    same partitions, seeds and round budget; trains the ceilings centrally; writes a report
    (comparison with mean ± std over seeds, JSON, CSV, plots, t-SNE, Markdown) and prints
    the tables. Ctrl-C stops everything.

    \b
    The offline default: Fashion-MNIST 0-4 on a ViT pre-trained on 5-9, IID and Dirichlet(0.1),
    3 seeds (about 11 minutes on 2 cores):
      sfprompt-sim
    The seconds-long setting of the tests:
      sfprompt-sim --data digits --seeds 1 --partitions iid --rounds 3 --no-ceilings
    The ablations next to SFPrompt, and a milder non-IID split:
      sfprompt-sim --methods sfprompt,sfprompt_no_prune,sfprompt_no_local,sfl_linear \\
          --partitions iid,dirichlet:0.1,dirichlet:1
    A clients-count sweep, as the paper's appendix Figure 2:
      sfprompt-sim --clients 5,10,20,50 --rounds 5
    CIFAR-10 with a pre-trained ViT-Base, where the network allows:
      sfprompt-sim --data cifar10 --root ~/data --download \\
          --model vit_base_patch16_224 --pretrained --clients 10 --rounds 20
    """
    from sfprompt.export.model_loading import ModelError, parse_model_args

    from .comparison import comparison_rows, print_comparison
    from .pipeline import SimConfig, run_simulation
    from .report import print_summary

    values = merge_config(ctx, flags, config_file)
    values["model_args"] = parse_model_args(values["model_args"]) if values["model_args"] else {}
    for key in ("max_train", "max_test"):
        if values.get(key) == 0:
            values[key] = None
    for key in ("root", "checkpoint", "out", "cache"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    unknown = set(values["methods"]) - set(METHODS)
    if unknown:
        raise click.UsageError(f"unknown method(s) {', '.join(sorted(unknown))}")
    try:
        cfg = SimConfig(**{f.name: values[f.name] for f in fields(SimConfig) if f.name in values})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _interrupt_on_signals()
    start = time.perf_counter()
    try:
        outcome = run_simulation(cfg, say=lambda m: console.log(m))
    except KeyboardInterrupt:
        console.print("[yellow]stopped[/]: every process was stopped; partial runs are in", cfg.out)
        raise SystemExit(130) from None
    except (ModelError, ValueError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    print_summary(outcome.primary, console)
    print_comparison(comparison_rows(outcome.runs), outcome.ceilings, console)
    folder = outcome.report_dir
    console.print(
        f"report: {folder / 'comparison.md'} and {folder / 'summary.md'} "
        f"({time.perf_counter() - start:.0f} s)"
    )


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the run (every child process is stopped on the way out),
    even where a launcher started us with SIGINT ignored."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
