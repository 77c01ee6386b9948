"""`--config FILE` for every command: a JSON or TOML file whose keys are the command's options.

A key is spelled like the flag (`memory-budget` or `memory_budget` for `--memory-budget`) or
like the parameter it fills (`memory_budget_mb`, as older files have it). Each value is
converted and checked by the option's own click type, so a file is held to the same rules as
the command line. Flags given on the command line win over the file, and the file wins over
the defaults, so a team can keep a config in version control and still override one value.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's keys and values as written; raises click.ClickException if unreadable."""
    try:
        text = Path(path).read_text()
        data: Any = _parse_toml(text) if Path(path).suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise click.ClickException(f"config {path} must hold an object of option: value")
    return {str(k): v for k, v in data.items()}


def _parse_toml(text: str) -> dict[str, Any]:
    """tomllib is Python 3.11+; on 3.10 the `tomli` backport reads the same files."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise click.ClickException(
                "reading a TOML config needs Python 3.11 or `pip install tomli`; "
                "or write the same keys as a .json file"
            ) from None
    return tomllib.loads(text)


def _spelling(key: str) -> str:
    """One form for `--memory-budget`, `memory-budget` and `memory_budget`."""
    return key.lstrip("-").replace("-", "_")


def option_keys(command: click.Command, names: set[str]) -> dict[str, click.Parameter]:
    """Every accepted key spelling of the parameters named in `names`: each long flag (not the
    `--no-x` side of a boolean pair, which means the opposite) and the parameter's own name."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name not in names:
            continue
        for opt in param.opts:
            if opt.startswith("--"):
                keys.setdefault(_spelling(opt), param)
        keys.setdefault(_spelling(str(param.name)), param)
    return keys


def negative_keys(command: click.Command, names: set[str]) -> dict[str, click.Parameter]:
    """The `--no-x` sides of the boolean pairs named in `names`: `no-progress = true` in a
    file means what `--no-progress` means."""
    return {
        _spelling(opt): param
        for param in command.params
        if param.name in names
        for opt in getattr(param, "secondary_opts", ())
        if opt.startswith("--")
    }


def _flag_name(param: click.Parameter) -> str:
    """How the file should spell `param`: its first long flag without the dashes."""
    long = [opt for opt in param.opts if opt.startswith("--")]
    return long[0][2:] if long else str(param.name)


def _convert(ctx: click.Context, param: click.Parameter, key: str, value: Any, path: Path) -> Any:
    """`value` as the flag would have given it, or a ClickException naming file, key and type.
    A repeatable flag also takes one value alone; no flag takes a table."""
    many = "a list of " if getattr(param, "multiple", False) or param.nargs != 1 else ""
    if getattr(param.type, "takes_table", False) and isinstance(value, dict):
        return dict(value)  # e.g. timm overrides as a table rather than KEY=VALUE items
    if getattr(param.type, "takes_table", False) and not isinstance(value, list):
        raise click.ClickException(
            f"{path}: {key} must be a table (key = value) or a list of {param.type.name}"
        )
    try:
        if isinstance(value, dict):
            raise click.BadParameter("a table/object is not a value")
        return param.type_cast_value(ctx, [value] if many and isinstance(value, str) else value)
    except (click.BadParameter, TypeError, ValueError) as exc:
        detail = exc.message if isinstance(exc, click.BadParameter) else str(exc)
        raise click.ClickException(
            f"{path}: {key} = {value!r} is not valid: {detail.rstrip('.')} "
            f"(expected {many}{param.type.name} for --{_flag_name(param)})"
        ) from exc


def _unknown(path: Path, unknown: list[str], keys: dict[str, click.Parameter]) -> str:
    known = sorted({_flag_name(p) for p in keys.values()})
    hints = [
        f"{key} (did you mean {close[0]}?)" if close else key
        for key in unknown
        for close in [difflib.get_close_matches(key.lstrip("-"), known, n=1)]
    ]
    return f"{path}: unknown option(s) {', '.join(hints)}; known: {', '.join(known)}"


# Where a value beats the file from: typed flags, and variables such as SFPROMPT_BROKER_PASSWORD
# (a secret is better kept in the environment than in a config file under version control).
_TYPED = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def merge_config(ctx: click.Context, flags: dict[str, Any], path: Path | None) -> dict[str, Any]:
    """Flags typed on the command line and environment variables > the config file > the
    flags' defaults.

    `flags` are the command's keyword arguments by parameter name; the file may set any of
    them. Raises click.ClickException for an unknown key, a key given twice or a value its
    option would refuse.
    """
    if path is None:
        return dict(flags)
    merged = dict(flags)
    for name, value in config_values(ctx, set(flags), path).items():
        if ctx.get_parameter_source(name) not in _TYPED:
            merged[name] = value
    return merged


def config_values(ctx: click.Context, names: set[str], path: Path) -> dict[str, Any]:
    """The file's entries by parameter name (only `names` may be set), each converted by its
    option's click type (a `no-x` key of a `--x/--no-x` pair to the opposite)."""
    values = {}
    negative = negative_keys(ctx.command, names)
    for key, (param, value) in _match_keys(ctx.command, names, path).items():
        values[str(param.name)] = _convert(ctx, param, key, value, path)
        if negative.get(_spelling(key)) is param:
            values[str(param.name)] = not values[str(param.name)]
    return values


def _match_keys(
    command: click.Command, names: set[str], path: Path
) -> dict[str, tuple[click.Parameter, Any]]:
    """The file's entries with the parameter each sets; refuses unknown keys and one option
    set under two spellings (which one would win is not obvious from the file)."""
    keys = {**negative_keys(command, names), **option_keys(command, names)}
    matched: dict[str, tuple[click.Parameter, Any]] = {}
    unknown: list[str] = []
    by_name: dict[str, str] = {}
    for key, value in read_config_file(path).items():
        param = keys.get(_spelling(key))
        if param is None:
            unknown.append(key)
            continue
        if str(param.name) in by_name:
            raise click.ClickException(
                f"{path}: {by_name[str(param.name)]} and {key} set the same option"
            )
        by_name[str(param.name)] = key
        matched[key] = (param, value)
    if unknown:
        raise click.ClickException(_unknown(path, unknown, keys))
    return matched
