"""Every option of every command is one dataclass field: same name, same default, and a config
file may set it under its flag's name (sfprompt/options.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest

from sfprompt.broker_login import BrokerLogin
from sfprompt.cloud_server.broker_config import AddDevicesOptions, BrokerConfigOptions
from sfprompt.cloud_server.cli import main as cloud
from sfprompt.cloud_server.config import BrokerSettings, ModelSource, ServeConfig, WorkerConfig
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.config_file import config_values
from sfprompt.edge_client.cli import main as edge
from sfprompt.edge_client.config import EdgeConfig
from sfprompt.edge_client.profile import ProfileConfig
from sfprompt.export.cli import PlanConfig
from sfprompt.export.cli import main as export
from sfprompt.export.config import ExportConfig
from sfprompt.options import KEY, CommaList, KeyValue, Verbosity, build, write_config
from sfprompt.sim.audit_cli import TrafficAuditConfig
from sfprompt.sim.audit_cli import main as audit
from sfprompt.sim.cli import main as sim
from sfprompt.sim.config import SimConfig
from sfprompt.sim.pretrain import PretrainConfig
from sfprompt.sim.pretrain import main as pretrain

# Every command and the dataclasses its options fill.
COMMANDS: dict[str, tuple[click.Command, tuple[type, ...]]] = {
    "sfprompt-cloud serve": (cloud.commands["serve"], (ServeConfig, Verbosity)),
    "sfprompt-cloud worker": (cloud.commands["worker"], (WorkerConfig, Verbosity)),
    "sfprompt-cloud broker-config": (
        cloud.commands["broker-config"],
        (BrokerConfigOptions, AddDevicesOptions),
    ),
    "sfprompt-edge start": (edge.commands["start"], (EdgeConfig, Verbosity)),
    "sfprompt-edge profile": (edge.commands["profile"], (ProfileConfig,)),
    "sfprompt-export bundle": (export.commands["bundle"], (ExportConfig,)),
    "sfprompt-export plan": (export.commands["plan"], (ExportConfig, PlanConfig)),
    "sfprompt-sim": (sim, (SimConfig,)),
    "sfprompt-pretrain": (pretrain, (PretrainConfig,)),
    "sfprompt-audit": (audit, (TrafficAuditConfig,)),
}
# What a command does rather than what it configures: not a field of any config.
SWITCHES = {"config_file", "help", "add", "force", "more_devices", "capture_dir"}


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@pytest.mark.parametrize("name", COMMANDS)
def test_each_option_is_one_field_with_the_same_default(name: str) -> None:
    command, configs = COMMANDS[name]
    fields = {}
    for config in configs:
        for field in _fields(config):
            assert field.name not in fields, f"{name}: {field.name} defined twice"
            fields[field.name] = field
    options = [p for p in command.params if p.name not in SWITCHES]
    assert options, name
    for param in options:
        assert param.name in fields, f"{name}: {param.opts} is no dataclass field"
        expected = default_of(fields[param.name])
        got = param.default
        if isinstance(expected, dict):  # a repeatable KEY=VALUE flag: no items by default
            expected = ()
        assert got == expected, f"{name} {param.opts}: {got!r} vs the field's {expected!r}"


def _fields(config: type) -> list[dataclasses.Field]:
    out = []
    for field in dataclasses.fields(config):
        if KEY not in field.metadata:
            out += _fields(_nested_type(config, field))
        elif field.metadata[KEY] is not None:
            out.append(field)
    return out


def _nested_type(config: type, field: dataclasses.Field) -> type:
    assert field.default_factory is not dataclasses.MISSING, f"{config.__name__}.{field.name}"
    return type(field.default_factory())


def a_value(param: click.Parameter, tmp_path: Path) -> Any:
    """A value of the option's type that its checks accept."""
    kind = param.type
    if isinstance(kind, KeyValue):
        return {"depth": 4}
    if isinstance(kind, CommaList):
        return [kind.kind("5" if kind.kind is int else "iid")]
    if isinstance(kind, click.Choice):
        value: Any = kind.choices[0]
    elif isinstance(kind, click.Path):
        value = str(tmp_path / "a_file" if kind.dir_okay is False else tmp_path)
    elif getattr(param, "is_flag", False):
        value = True
    elif kind is click.INT or isinstance(kind, click.types.IntParamType):
        value = 1
    elif isinstance(kind, click.types.FloatParamType):
        value = 1.0
    elif param.name == "device":
        value = "cuda:1"  # a torch device name, as BodyConfig takes it
    else:
        value = "text"
    return [value] if getattr(param, "multiple", False) else value


@pytest.mark.parametrize("name", COMMANDS)
def test_a_config_file_may_set_every_option_under_its_flag_name(name: str, tmp_path: Path) -> None:
    command, _ = COMMANDS[name]
    (tmp_path / "a_file").write_text("x\n")
    params = [p for p in command.params if p.name not in SWITCHES and isinstance(p, click.Option)]
    entries = {}
    for param in params:
        long = [o for o in param.opts if o.startswith("--")][0]
        entries[long[2:]] = a_value(param, tmp_path)
    path = tmp_path / "every.json"
    path.write_text(json.dumps(entries))
    ctx = click.Context(command)
    values = config_values(ctx, {str(p.name) for p in params}, path)
    assert set(values) == {p.name for p in params}


def test_the_no_side_of_a_pair_is_a_key_too(tmp_path: Path) -> None:
    command = cloud.commands["serve"]
    path = tmp_path / "serve.toml"
    path.write_text("no-progress = true\n")
    assert config_values(click.Context(command), {"progress"}, path) == {"progress": False}


def test_a_written_config_builds_the_same_dataclasses(tmp_path: Path) -> None:
    """The simulator starts `serve` and `start` from files written by `write_config`."""
    (tmp_path / "password").write_text("secret\n")
    serve = ServeConfig(
        source=ModelSource(bundle=tmp_path, model_args={"depth": 2}),
        broker=BrokerSettings(
            "mqtt://127.0.0.1:1",
            BrokerLogin("server", password_file=tmp_path / "password"),
        ),
        rounds=RoundConfig(rounds=3, keep_ratio=1.0, local_epochs=0, min_devices=2),
        test_data=tmp_path,
        eval_samples=100000,
        progress=False,
    )
    path = write_config(tmp_path / "serve.json", serve, Verbosity(verbose=True))
    command = cloud.commands["serve"]
    names = {str(p.name) for p in command.params}
    values = {p.name: p.default for p in command.params} | config_values(
        click.Context(command), names, path
    )
    assert build(ServeConfig, values) == serve
    assert build(Verbosity, values) == Verbosity(verbose=True)


def test_a_written_worker_config_is_one_worker_reads(tmp_path: Path) -> None:
    """Options at their default are left out of a written file: a worker's carries none of the
    embedded broker's options, which `worker --config` does not take."""
    worker = WorkerConfig(
        source=ModelSource(bundle=tmp_path),
        broker=BrokerSettings("mqtt://127.0.0.1:1", BrokerLogin("server-worker-0")),
        index=1,
        workers=2,
    )
    path = write_config(tmp_path / "worker.json", worker)
    assert not {"devices", "listen", "embedded-port"} & set(json.loads(path.read_text()))
    command = cloud.commands["worker"]
    names = {str(p.name) for p in command.params}
    values = {p.name: p.default for p in command.params} | config_values(
        click.Context(command), names, path
    )
    assert build(WorkerConfig, values) == worker


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--id", "gpu0", "--index", "1", "--of", "2"], "give one or the other"),
        (["--id", "gpu0", "--capacity", "0"], "--capacity must be a finite number > 0"),
        (["--id", "gpu0", "--capacity", "nan"], "--capacity must be a finite number > 0"),
        (["--index", "2", "--of", "2"], "--index must be in [0, --of)"),
    ],
)
def test_worker_refuses_flags_of_both_pools_or_a_bad_place(
    tmp_path: Path, flags: list[str], refusal: str
) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cloud, ["worker", "--bundle", str(tmp_path), *flags])
    assert result.exit_code == 2, result.output
    assert refusal in result.output


def test_a_combination_a_config_refuses_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sfprompt.edge_client.cli import main as edge

    args = ["start", "--bundle", str(tmp_path), "--data", str(tmp_path), "--device-id", "d"]
    result = CliRunner().invoke(edge, [*args, "--require-noise", "-1"])
    assert result.exit_code == 2, result.output
    assert "--require-noise must be a finite number >= 0" in result.output
