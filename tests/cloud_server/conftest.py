"""The server half of one small random ViT, built once for the batcher and bounds tests."""

from __future__ import annotations

import pytest

from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.export.config import ExportConfig
from tests.bundles import SMALL_VIT


@pytest.fixture(scope="session")
def model() -> ServerModel:
    """Built from timm (no bundle on disk): 5 classes, 3 prompts, on the CPU. Shared: its
    weights are frozen and the tests only run it."""
    cfg = ExportConfig(num_classes=5, model_args=dict(SMALL_VIT), prompts=3, seed=1)
    return ServerModel.from_timm(cfg, BodyConfig(device="cpu"))
