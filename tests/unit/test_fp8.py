"""services.model.fp8: block dequantisation (partial blocks too), quantisation, bad scales;
and the quantization_config that names the block."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import CheckpointError, ConfigError
from services.model import fp8
from services.model.config import ModelConfig
from services.model.presets import PRESETS
from tests.fp8_reference import dequantize_by_blocks


def _random_fp8(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(fp8.FP8_DTYPE)


@pytest.mark.parametrize("shape, block", [((50, 37), (16, 8)), ((64, 32), (128, 128)),
                                          ((256, 128), (128, 128)), ((7, 300), (3, 128))])
def test_dequantize_matches_the_block_by_block_definition(shape, block):
    q = _random_fp8(shape)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale_inv = torch.rand(grid, generator=torch.Generator().manual_seed(1)) + 0.01
    assert fp8.scale_shape(shape, block) == grid
    got = fp8.dequantize(q, scale_inv, block, "w")
    assert got.dtype == torch.float32
    assert torch.equal(got, dequantize_by_blocks(q, scale_inv, block))


@pytest.mark.parametrize("shape, block", [((70, 45), (32, 32)), ((64, 32), (128, 128))])
def test_quantize_uses_amax_over_448_per_block(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    q, scale_inv = fp8.quantize(w, block)
    assert q.dtype == fp8.FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == fp8.scale_shape(shape, block)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            tile = (slice(bi * block[0], (bi + 1) * block[0]), slice(bj * block[1], (bj + 1) * block[1]))
            assert scale_inv[bi, bj].item() == pytest.approx(w[tile].abs().max().item() / 448, rel=1e-6)
            assert q[tile].float().abs().max().item() == 448.0  # each block's amax uses the range
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 relative; a value in
    # the subnormal range (below 2^-6 before scaling) by at most half the 2^-9 step.
    step = dequantize_by_blocks(torch.ones(shape).to(fp8.FP8_DTYPE), scale_inv, block)  # per element
    error = (fp8.dequantize(q, scale_inv, block, "w") - w).abs()
    assert (error <= w.abs() * 2**-4 + step * 2**-10 + 1e-12).all()


def test_an_all_zero_block_has_scale_zero_and_stays_zero():
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    w[:4, :4] = 0
    q, scale_inv = fp8.quantize(w, (4, 4))
    assert scale_inv[0, 0].item() == 0.0 and torch.isfinite(q.float()).all()
    assert (fp8.dequantize(q, scale_inv, (4, 4), "w")[:4, :4] == 0).all()


def test_a_misshaped_scale_fails_naming_the_tensor():
    q = _random_fp8((50, 37))
    with pytest.raises(CheckpointError, match=r"'layer\.w\.weight_scale_inv' has shape \(4, 4\), "
                                              r"expected \(4, 5\)"):
        fp8.dequantize(q, torch.ones(4, 4), (16, 8), "layer.w.weight")
    with pytest.raises(CheckpointError, match="layer.w.weight_scale_inv"):
        fp8.dequantize(q, torch.ones(20), (16, 8), "layer.w.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_scale_fails_naming_the_tensor_and_block(bad):
    scale_inv = torch.ones(4, 5)
    scale_inv[2, 3] = bad
    with pytest.raises(CheckpointError, match=r"'layer\.w\.weight_scale_inv' holds 1 non-finite "
                                              r"scale\(s\), first at block \(2, 3\)"):
        fp8.dequantize(_random_fp8((50, 37)), scale_inv, (16, 8), "layer.w.weight")


def test_only_e4m3_weights_are_dequantized():
    with pytest.raises(CheckpointError, match="'w' is torch.bfloat16"):
        fp8.dequantize(torch.ones(4, 4, dtype=torch.bfloat16), torch.ones(1, 1), (4, 4), "w")


QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
         "weight_block_size": [128, 128]}


def test_quantization_config_gives_the_block():
    assert ModelConfig.from_dict(dict(PRESETS["tiny"])).fp8_weight_block is None
    cfg = ModelConfig.from_dict({**PRESETS["tiny"], "quantization_config": QUANT})
    assert cfg.fp8_weight_block == (128, 128)
    odd = {**QUANT, "weight_block_size": [64, 32]}
    assert ModelConfig.from_dict({**PRESETS["tiny"], "quantization_config": odd}).fp8_weight_block == (64, 32)


@pytest.mark.parametrize("change, field", [
    ({"quant_method": "awq"}, "quant_method"),
    ({"fmt": "e5m2"}, "fmt"),
    ({"activation_scheme": "static"}, "activation_scheme"),
    ({"weight_block_size": None}, "weight_block_size"),
    ({"weight_block_size": [128]}, "weight_block_size"),
    ({"weight_block_size": [128, 0]}, "weight_block_size"),
    ({"weight_block_size": [128, 12.5]}, "weight_block_size"),
])
def test_unsupported_quantization_config_is_named(change, field):
    with pytest.raises(ConfigError, match=f"quantization_config.{field}"):
        ModelConfig.from_dict({**PRESETS["tiny"], "quantization_config": {**QUANT, **change}})
