"""Session fixtures for the exporter tests: one tiny real train + bundle, reused by all."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.torch_bundle import build_tiny_bundle


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ``data/`` (colour PNGs), ``run/`` (1-epoch resnet18) and ``bundle/``."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_bundle(root)
    return root
