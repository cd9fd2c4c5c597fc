"""Shared fixtures: models built once per test session."""

from __future__ import annotations

import pytest

from cocoon_p2p.models import ModelSpec, load_model
from cocoon_p2p.tinymodel import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "tiny.onnx")
    return load_model(path, name="tiny", max_batch=8)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """The tiny model with a wide hidden layer: long enough jobs to cancel or kill."""
    path = build_tiny_model(tmp_path_factory.mktemp("models") / "slow.onnx", hidden=2048)
    return load_model(path, name="slow", max_batch=1)
