"""One logging set-up for every command: what happens at INFO by default, details with -v.

Only sfprompt's own loggers go below WARNING, so -v shows our details and not those of every
library underneath (PIL, matplotlib, onnxruntime)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler


def setup_logging(
    verbose: bool = False, quiet: bool = False, console: Console | None = None
) -> None:
    """INFO by default; `verbose`: DEBUG; `quiet`: warnings and errors only."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console or Console(stderr=True), show_path=False)],
    )
    logging.getLogger("sfprompt").setLevel(level)
