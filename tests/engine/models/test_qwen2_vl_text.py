"""Qwen2-VL / Qwen2.5-VL on text alone: every family's checks (engine/models/family_checks.py)
against transformers, their M-RoPE with three equal positions per token."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.models import load_model
from tests.engine.models.family_checks import *  # noqa: F403
from tests.engine.models.test_qwen2_vl import FAMILIES, save_tiny_qwen2_vl


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_qwen2_vl(path, request.param)
    return hf, load_model(str(path), torch.float32, "cpu")
