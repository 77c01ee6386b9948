"""`--config FILE` for every command: a JSON or TOML file whose keys are the command's options.

Flags given on the command line win over the file, and the file wins over the defaults, so a
team can keep a config in version control and still override one value for a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's keys with '-' turned into '_'; raises click.ClickException if unreadable."""
    try:
        text = Path(path).read_text()
        if Path(path).suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise click.ClickException(f"config {path} must hold an object of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_config(ctx: click.Context, flags: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Flags typed on the command line > the config file > the flags' defaults."""
    if path is None:
        return dict(flags)
    from_file = read_config_file(path)
    unknown = set(from_file) - set(flags)
    if unknown:
        raise click.ClickException(
            f"{path}: unknown option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(flags))}"
        )
    merged = dict(flags)
    for key, value in from_file.items():
        if ctx.get_parameter_source(key) != ParameterSource.COMMANDLINE:
            merged[key] = value
    return merged
