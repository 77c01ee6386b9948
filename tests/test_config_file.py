"""`--config FILE`: flags typed on the command line win over the file, the file over defaults."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

from sfprompt.config_file import merge_config


@click.command()
@click.option("--rounds", type=int, default=10)
@click.option("--broker", default="mqtt://127.0.0.1:1883")
@click.option("--config", "config_file", type=click.Path(path_type=Path))
@click.pass_context
def show(ctx: click.Context, config_file: Path | None, **flags: object) -> None:
    click.echo(json.dumps(merge_config(ctx, flags, config_file), sort_keys=True))


def test_flags_win_over_the_file_and_the_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rounds": 3, "broker": "mqtt://b:1"}))
    out = CliRunner().invoke(show, ["--config", str(cfg), "--rounds", "7"])
    assert json.loads(out.output) == {"rounds": 7, "broker": "mqtt://b:1"}


def test_a_toml_file_works_too(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('rounds = 4\nbroker = "mqtt://c:2"\n')
    out = CliRunner().invoke(show, ["--config", str(cfg)])
    assert json.loads(out.output) == {"rounds": 4, "broker": "mqtt://c:2"}


def test_an_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rounds": 2, "round": 3}))
    out = CliRunner().invoke(show, ["--config", str(cfg)])
    assert out.exit_code != 0 and "unknown option(s) round" in out.output


def test_a_device_without_a_bundle_gets_a_clear_error(tmp_path: Path) -> None:
    from sfprompt.edge_client.cli import main

    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps({"device-id": "pi-07"}))
    out = CliRunner().invoke(main, ["start", "--config", str(cfg)])
    assert out.exit_code == 2 and "--bundle is required" in out.output


@click.command()
@click.option("--memory-budget", "memory_budget_mb", type=float)
@click.option("--micro-batch", type=int, default=4)
@click.option("--runtime", type=click.Choice(["onnx", "torchscript"]), default="onnx")
@click.option("--model-arg", "model_args", multiple=True)
@click.option("--pretrained/--random-init", default=False)
@click.option("--config", "config_file", type=click.Path(path_type=Path))
@click.pass_context
def device(ctx: click.Context, config_file: Path | None, **flags: object) -> None:
    click.echo(json.dumps(merge_config(ctx, flags, config_file), sort_keys=True))


def run_device(tmp_path: Path, entries: dict, *args: str) -> tuple[int, str]:
    cfg = tmp_path / "device.json"
    cfg.write_text(json.dumps(entries))
    out = CliRunner().invoke(device, ["--config", str(cfg), *args])
    return out.exit_code, out.output


@pytest.mark.parametrize("key", ["memory-budget", "memory_budget", "memory_budget_mb"])
def test_a_key_spelled_like_the_flag_or_the_parameter_fills_the_parameter(
    tmp_path: Path, key: str
) -> None:
    code, output = run_device(tmp_path, {key: 300})
    assert code == 0, output
    assert json.loads(output)["memory_budget_mb"] == 300.0


def test_a_flag_still_wins_over_a_key_spelled_like_it(tmp_path: Path) -> None:
    code, output = run_device(tmp_path, {"memory-budget": 300}, "--memory-budget", "200")
    assert code == 0, output
    assert json.loads(output)["memory_budget_mb"] == 200.0


def test_values_are_converted_by_the_options_type(tmp_path: Path) -> None:
    entries = {
        "memory-budget": "300",
        "micro-batch": 2,
        "model-arg": "depth=4",
        "pretrained": "yes",
    }
    code, output = run_device(tmp_path, entries)
    assert code == 0, output
    assert json.loads(output) == {
        "memory_budget_mb": 300.0,
        "micro_batch": 2,
        "runtime": "onnx",
        "model_args": ["depth=4"],  # one value for a repeatable flag is a list of one
        "pretrained": True,
    }


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("micro-batch", "four", "expected integer for --micro-batch"),
        ("micro_batch", [4], "expected integer for --micro-batch"),
        ("runtime", "tflite", "'tflite' is not one of 'onnx', 'torchscript'"),
        ("memory-budget", {"mb": 3}, "expected float for --memory-budget"),
        ("model-arg", 3, "expected a list of text for --model-arg"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_file_key_and_type(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    code, output = run_device(tmp_path, {key: value})
    assert code == 1 and "Traceback" not in output
    assert f"device.json: {key} = {value!r} is not valid" in output.replace("\n", " ")
    assert expected in output


def test_an_unknown_key_lists_the_flag_names_and_the_closest(tmp_path: Path) -> None:
    code, output = run_device(tmp_path, {"memory-budgt": 3})
    assert code == 1
    assert "unknown option(s) memory-budgt (did you mean memory-budget?)" in output
    assert "known: memory-budget, micro-batch, model-arg, pretrained, runtime" in output


def test_one_option_under_two_spellings_is_refused(tmp_path: Path) -> None:
    code, output = run_device(tmp_path, {"memory-budget": 3, "memory_budget_mb": 4})
    assert code == 1 and "memory-budget and memory_budget_mb set the same option" in output


def test_toml_reads_with_tomli_where_tomllib_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.10 has no tomllib: the tomli backport, or a clear error."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('rounds = 4\nbroker = "mqtt://c:2"\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib raises ImportError
    tomli = SimpleNamespace(loads=lambda text: {"rounds": 4, "broker": "mqtt://c:2"})
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    out = CliRunner().invoke(show, ["--config", str(cfg)])
    assert json.loads(out.output) == {"rounds": 4, "broker": "mqtt://c:2"}
    monkeypatch.setitem(sys.modules, "tomli", None)
    out = CliRunner().invoke(show, ["--config", str(cfg)])
    assert out.exit_code == 1 and "pip install tomli" in out.output
    assert "Traceback" not in out.output


def test_the_device_reads_its_memory_budget_from_a_key_like_the_flag(tmp_path: Path) -> None:
    from sfprompt.edge_client.cli import main

    cfg = tmp_path / "device.toml"
    cfg.write_text('device-id = "pi-07"\nmemory-budget = "lots"\n')
    out = CliRunner().invoke(main, ["start", "--config", str(cfg)])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "memory-budget = 'lots' is not valid" in out.output
    cfg.write_text('device-id = "pi-07"\nmemory-budget = 300\n')
    out = CliRunner().invoke(main, ["start", "--config", str(cfg)])
    assert out.exit_code == 2 and "--bundle is required" in out.output
