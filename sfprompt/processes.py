"""Where a Python child process starts, so that it imports the same `sfprompt` as its parent."""

from __future__ import annotations

from pathlib import Path


def child_cwd() -> Path:
    """The folder holding this `sfprompt` package (the checkout, or site-packages).

    A child started with `python -m sfprompt...` puts its working directory first on its path:
    started here it imports this very package, wherever the parent itself was started (a
    checkout next to an install, or a folder holding some other `sfprompt`). Paths handed to
    such a child must therefore be absolute.
    """
    return Path(__file__).resolve().parent.parent
