"""Shared fixtures: small bundles exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 4}


@pytest.fixture(scope="session")
def bundles_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def small_export(bundles_root: Path):
    """One small exported model (device + server bundles) shared by the training tests."""
    from tests.federation.harness import export_small

    return export_small(bundles_root / "small")
