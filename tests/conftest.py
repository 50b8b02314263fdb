"""Session-wide fixtures: small checkpoints generated once per test run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import structlog

from services.model.checkpoint_gen import make_model

# tests/gpu runs only where a GPU is (scripts/gpu_smoke.sh sets EPSERVE_GPU=1); CI has none.
collect_ignore = [] if os.environ.get("EPSERVE_GPU") == "1" else ["gpu"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_mtp_model_dir(tmp_path_factory) -> Path:
    """tiny with V3's MTP layer: the main model's weights are tiny's (the MTP layer is drawn
    after them), so tiny's reference engine is this checkpoint's plain decoding."""
    return make_model("tiny", tmp_path_factory.mktemp("tiny_mtp"), seed=0, mtp=True)


@pytest.fixture(scope="session")
def tiny_fp8_model_dir(tmp_path_factory) -> Path:
    """tiny with FP8 block-quantised linears, blocks of 24: partial blocks in every weight."""
    return make_model("tiny", tmp_path_factory.mktemp("tinyfp8"), seed=0, fp8_block=24)


@pytest.fixture(scope="session")
def mini_model_dir(tmp_path_factory) -> Path:
    return make_model("v3-mini", tmp_path_factory.mktemp("v3mini"), seed=0)


@pytest.fixture(autouse=True)
def _fresh_logging_config():
    """Tests that run the CLI in-process configure logging globally (level, stream); undo it
    so that the next test sees structlog's defaults (e.g. capture_logs sees info events)."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_epserve", False)]:
        root.removeHandler(handler)
