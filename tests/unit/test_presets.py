"""The presets are complete DeepSeek configs; v3-wide is the compute-dominated one."""

from __future__ import annotations

import pytest

from services.model.config import ModelConfig
from services.model.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name):
    cfg = ModelConfig.from_dict(dict(PRESETS[name]))
    assert cfg.moe_layer_ids and cfg.n_routed_experts % cfg.n_group == 0


def test_v3_wide_is_compute_dominated_and_fits_this_machine():
    cfg = ModelConfig.from_dict(dict(PRESETS["v3-wide"]))
    assert cfg.hidden_size >= 1024  # issue 15: at hidden 256 Python overhead is most of an op
    experts = cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert experts * len(cfg.moe_layer_ids) * 4 < 1 << 30  # fp32 experts under 1 GiB
