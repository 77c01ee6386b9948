"""`--config FILE`: flags typed on the command line win over the file, the file over defaults."""

from __future__ import annotations

import json
from pathlib import Path

import click
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
