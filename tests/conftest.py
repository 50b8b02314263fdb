"""Session-wide fixtures: small checkpoints generated once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.model.checkpoint_gen import make_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def mini_model_dir(tmp_path_factory) -> Path:
    return make_model("v3-mini", tmp_path_factory.mktemp("v3mini"), seed=0)
