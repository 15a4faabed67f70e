"""Fixtures of the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A fresh cache directory for the converted models (`EngineConfig.cache_dir`)."""
    return tmp_path / "cache"
