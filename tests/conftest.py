"""Shared fixtures: bundles exported once per test session, and a private Mosquitto per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sfprompt.export.bundle_writer import ExportResult
from sfprompt.protocol.broker import EmbeddedBroker
from tests.bundles import ExportedCases, export_small


@pytest.fixture(scope="session")
def bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def exported_cases(bundles_root: Path) -> ExportedCases:
    """The cases of tests/bundles.py CASES, each exported on first use and then shared:
    `exported_cases["avg_m1"]`. Read-only: copy a bundle into `tmp_path` to damage it."""
    return ExportedCases(bundles_root / "cases")


@pytest.fixture(scope="session")
def small_export(bundles_root: Path) -> ExportResult:
    """One small exported model (device + server bundles) shared by the training tests."""
    return export_small(bundles_root / "small")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A private Mosquitto on a free loopback port (never the system one), with persistence so
    a test may restart it, stopped after the test."""
    with EmbeddedBroker(tmp_path / "broker", persistence=True) as running:
        yield running
