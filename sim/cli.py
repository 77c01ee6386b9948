"""`sfprompt-sim`: a whole federation on one machine, compared with the baselines, reported."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

import click
from rich.console import Console

from sfprompt.options import configs_from, options_from

from .config import SimConfig

# Wide enough for the summary table when the output goes to a log rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 180)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@options_from(SimConfig)
@click.pass_context
def main(ctx: click.Context, **values: Any) -> None:
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
    SFPrompt per encoding of activations (UP/DOWN for a pair), against fp32:
      sfprompt-sim --methods sfprompt --encodings fp32,fp16,bf16,int8,int8/fp16
    The leakage audit: attacks on one device's h and dL/dz under each defense setting:
      sfprompt-sim --data digits --seeds 1 --partitions iid --rounds 3 --no-ceilings \\
          --methods sfprompt --audit
    CIFAR-10 with a pre-trained ViT-Base, where the network allows:
      sfprompt-sim --data cifar10 --root ~/data --download \\
          --model vit_base_patch16_224 --pretrained --clients 10 --rounds 20
    """
    from sfprompt.export.config import ModelError

    from .comparison import comparison_rows, print_comparison
    from .encodings import print_encodings
    from .pipeline import run_simulation
    from .report import print_summary

    try:
        (cfg,) = configs_from(ctx, values, SimConfig)
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
    if outcome.encodings:
        print_encodings(outcome.encodings, console)
    if outcome.audit:
        from .audit_report import print_audit

        print_audit(outcome.audit, console)
    folder = outcome.report_dir
    more = f", {folder / 'encodings.md'}" if outcome.encodings else ""
    more += f", {folder / 'audit.md'}" if outcome.audit else ""
    console.print(
        f"report: {folder / 'comparison.md'}{more} and {folder / 'summary.md'} "
        f"({time.perf_counter() - start:.0f} s)"
    )


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM both stop the run (every child process is stopped on the way out),
    even where a launcher started us with SIGINT ignored."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
