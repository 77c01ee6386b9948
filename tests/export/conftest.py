"""The exported cases every graph test runs on: three small shapes and cuts, and ViT-Tiny at
its real size. Each export takes seconds, so the fast loop (`-m "not slow"`) keeps one case per
tail input that other fast tests share (token_m0: the class token, avg_m1: every patch token);
the mean-pooled avg_m0 and the real-size model run in the full suite."""

from __future__ import annotations

import pytest

from tests.bundles import Exported, ExportedCases

SLOW = pytest.mark.slow


@pytest.fixture(
    scope="session",
    params=[
        "token_m0",
        "avg_m1",
        pytest.param("avg_m0", marks=SLOW),
        pytest.param("vit_tiny_224", marks=SLOW),
    ],
)
def exported(request: pytest.FixtureRequest, exported_cases: ExportedCases) -> Exported:
    return exported_cases[request.param]
