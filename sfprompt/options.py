"""One definition of every option: a config dataclass's fields become a command's click options.

Each field says how it is offered in `metadata=opt(...)` (its help, and its flag where that is
not the field's name in kebab case); its default is the dataclass's own. So the flag, the
`--config FILE` key (spelled like the flag), `--help` and code that builds the dataclass
directly cannot disagree, and a default is changed in one place. A field marked `internal()`
is set by code only; a field whose type is itself a config dataclass brings that one's options.

    @main.command()
    @options_from(ServeConfig, Verbosity)
    @click.pass_context
    def serve(ctx, **values):
        cfg, verbosity = configs_from(ctx, values, ServeConfig, Verbosity)
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click

from sfprompt.config_file import merge_config

KEY = "sfprompt.option"  # where a field's metadata holds its Option (None: internal)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Option:
    """How one field is offered on the command line; see `opt`."""

    help: str = ""
    flag: str | None = None  # "--name", or a bool pair "--yes/--no"; default: --field-name
    short: str | None = None  # e.g. "-v"
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a regular expression the whole (text) value must match
    envvar: str | None = None
    metavar: str | None = None
    hidden: bool = False
    exists: bool = False  # a Path must exist; file_okay / dir_okay say which kind it may be
    file_okay: bool = True
    dir_okay: bool = True
    comma_list: bool = False  # a tuple as one "a,b,c" value rather than a repeated flag
    convert: Callable[[Any], Any] | None = None  # the parsed value -> the field's value
    show_default: bool | str = True


def opt(help: str = "", **details: Any) -> dict[str, Option]:
    """A field's metadata that makes it an option, e.g.
    `field(default=256, metadata=opt("Samples per body call", flag="--max-batch"))`."""
    return {KEY: Option(help, **details)}


def internal() -> dict[str, None]:
    """A field's metadata that keeps it off the command line (code sets it, or its default)."""
    return {KEY: None}


@dataclasses.dataclass(frozen=True)
class Verbosity:
    """How much the long-running commands log."""

    verbose: bool = dataclasses.field(
        default=False, metadata=opt("Also log debugging details.", short="-v")
    )
    quiet: bool = dataclasses.field(
        default=False, metadata=opt("Log only warnings and errors.", short="-q")
    )


CONFIG_HELP = "JSON or TOML file of these options, keys spelled like the flags (flags given win)."


def options_from(
    *configs: type, skip: Collection[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click option per option field of `configs` (in field order, nested
    config dataclasses included, the fields named in `skip` left out) and `--config FILE`.
    Raises TypeError for a field that is neither `opt()` nor `internal()`, or one name twice."""
    options = [o for config in configs for o in _options(config, set(skip))]
    names = [str(o.name) for o in options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{', '.join(twice)}: the same option in two fields of {configs}")
    config = click.Option(
        ["--config", "config_file"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=CONFIG_HELP,
    )

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        params = command.__dict__.setdefault("__click_params__", [])
        params.extend(reversed([*options, config]))  # click reverses the decorators' order
        return command

    return decorate


def configs_from(ctx: click.Context, values: dict[str, Any], *configs: type) -> tuple[Any, ...]:
    """The dataclasses `configs`, built from a command's parsed values and its --config FILE;
    a combination a dataclass refuses (ValueError) is a usage error that names it."""
    merged = merged_values(ctx, values)
    try:
        return tuple(build(config, merged) for config in configs)
    except ValueError as exc:
        raise click.UsageError(str(exc), ctx) from exc


def merged_values(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """A command's parsed values merged with its `--config FILE` (`values["config_file"]`):
    flags typed > the file > the defaults."""
    rest = {k: v for k, v in values.items() if k != "config_file"}
    return merge_config(ctx, rest, values.get("config_file"))


def build(config: type[T], values: Mapping[str, Any]) -> T:
    """`config` from option values by field name; nested configs are built the same way, and a
    field absent from `values` (internal, or skipped) keeps its default. Raises
    click.UsageError for a required option without a value, click.BadParameter for a value its
    field's `convert` refuses, and whatever the dataclass raises for a bad combination."""
    kwargs: dict[str, Any] = {}
    for field, hint, spec in _fields(config):
        if KEY not in field.metadata:  # a nested config
            kwargs[field.name] = build(_config_type(hint), values)  # type: ignore[arg-type]
        elif spec is not None and field.name in values:
            kwargs[field.name] = _field_value(field, hint, spec, values[field.name])
    return config(**kwargs)


def write_config(path: Path, *configs: Any) -> Path:
    """Write the option fields of the dataclass instances `configs` to a JSON `--config` file
    (keys spelled like the flags), for a command run as a process. Options unset or at their
    default are left out: the file then suits every command that shares the options it sets
    (`worker` takes `serve`'s broker settings but not the embedded broker's)."""
    entries: dict[str, Any] = {}
    for name, value, default in _option_values(configs):
        if value is not None and value != default:
            entries[name] = _json_value(value)
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------ field -> option


def _fields(config: type) -> Iterator[tuple[dataclasses.Field, Any, Option | None]]:
    """Each field of `config`, its resolved type and its Option (None: internal or nested)."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        hint = hints[field.name]
        if KEY not in field.metadata and _config_type(hint) is None:
            raise TypeError(f"{config.__name__}.{field.name} is neither opt() nor internal()")
        yield field, hint, field.metadata.get(KEY)


def _options(config: type, skip: set[str]) -> Iterator[click.Option]:
    for field, hint, spec in _fields(config):
        if spec is None and KEY not in field.metadata:
            yield from _options(_config_type(hint), skip)  # type: ignore[arg-type]
        elif spec is not None and field.name not in skip:
            yield _option(field, hint, spec)


def _option(field: dataclasses.Field, hint: Any, spec: Option) -> click.Option:
    """The click option of one field: its flag, type, default and help."""
    base = _without_none(hint)
    origin = typing.get_origin(base) or base
    default = _default(field)
    flag = flag_of(field, spec)
    if base is bool and default is True and "/" not in flag:
        flag = f"{flag}/--no-{flag[2:]}"
    attrs: dict[str, Any] = {
        "help": spec.help,
        "envvar": spec.envvar,
        "show_envvar": spec.envvar is not None,
        "metavar": spec.metavar,
        "hidden": spec.hidden,
        "show_default": spec.show_default if default not in (None, (), {}) else False,
    }
    if base is bool:
        attrs.update(is_flag=True, default=bool(default))
    elif origin is dict:
        attrs.update(type=KEY_VALUE, multiple=True, default=())
    elif origin is tuple and not spec.comma_list:
        attrs.update(type=_scalar(typing.get_args(base)[0], spec), multiple=True, default=default)
    elif origin is tuple:
        attrs.update(type=CommaList(typing.get_args(base)[0]), default=default)
    elif origin is list:
        attrs.update(type=TEXT_OR_LIST, default=default)
    else:
        attrs.update(type=_scalar(base, spec), default=default)
    decls = [d for d in (spec.short, flag, field.name) if d]
    return click.Option(decls, **attrs)


def flag_of(field: dataclasses.Field, spec: Option) -> str:
    """The field's long flag: the one its Option names, else `--field-name`."""
    return spec.flag or "--" + field.name.replace("_", "-")


def _scalar(kind: Any, spec: Option) -> click.ParamType:
    if spec.choices is not None:
        return click.Choice(spec.choices)
    if spec.pattern is not None:
        return Pattern(spec.pattern, spec.metavar or "TEXT")
    if kind is Path:
        return click.Path(
            exists=spec.exists, file_okay=spec.file_okay, dir_okay=spec.dir_okay, path_type=Path
        )
    scalars: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}
    return scalars[kind]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None  # required: `build` says so when no flag or file gave it


def _without_none(hint: Any) -> Any:
    """`X` of `X | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _config_type(hint: Any) -> type | None:
    base = _without_none(hint)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


# ------------------------------------------------------------------------------ value -> field


def _field_value(field: dataclasses.Field, hint: Any, spec: Option, value: Any) -> Any:
    if value is None:
        if _default(field) is None and field.default is dataclasses.MISSING:
            raise click.UsageError(f"{flag_of(field, spec)} is required (flag or config)")
        return None
    origin = typing.get_origin(_without_none(hint))
    if origin is dict and isinstance(value, Mapping):
        return dict(value)  # a table in a config file
    if spec.convert is not None:
        try:
            return spec.convert(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=flag_of(field, spec)) from exc
    if origin is tuple:
        return tuple(value)
    if origin is list:
        return list(value)
    return value


def _option_values(configs: tuple[Any, ...]) -> Iterator[tuple[str, Any, Any]]:
    """(flag name without dashes, value, default) of every option field of `configs`."""
    for config in configs:
        for field, _, spec in _fields(type(config)):
            value = getattr(config, field.name)
            if spec is None and KEY not in field.metadata:
                yield from _option_values((value,))
            elif spec is not None:
                yield flag_of(field, spec).split("/")[0][2:], value, _default(field)


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return value


# ------------------------------------------------------------------------------ click types


class KeyValue(click.ParamType):
    """One KEY=VALUE of a repeatable flag; in a config file the whole table may be given."""

    name = "KEY=VALUE"
    takes_table = True  # config_file keeps a table as written

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if not isinstance(value, str) or "=" not in value or value.startswith("="):
            self.fail(f"{value!r} is not of the form key=value", param, ctx)
        return value


class Pattern(click.ParamType):
    """Text that matches a regular expression, e.g. auto|cpu|cuda(:\\d+)? for a torch device."""

    def __init__(self, pattern: str, name: str) -> None:
        self.pattern = re.compile(pattern)
        self.name = name

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        if not self.pattern.fullmatch(str(value)):
            self.fail(f"{value!r} is not one of {self.name}", param, ctx)
        return str(value)


class CommaList(click.ParamType):
    """A tuple as "a,b,c" on the command line, or a list in a config file."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.name = f"{kind.__name__},..."

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            return tuple(self.kind(v) for v in items if str(v).strip())
        except ValueError:
            kind = self.kind.__name__
            self.fail(f"{value!r} is not a comma-separated list of {kind}", param, ctx)


class TextOrList(click.ParamType):
    """Text on the command line; in a config file also a list, kept as a list of text."""

    name = "text"

    def convert(self, value: Any, param: Any, ctx: Any) -> str | list[str]:
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return str(value)


KEY_VALUE = KeyValue()
TEXT_OR_LIST = TextOrList()
