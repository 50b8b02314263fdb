"""FP8 block quantisation of weights, as DeepSeek ships V3/R1: the math only, no files.

A quantised linear weight W [R, C] is stored as `q` (float8_e4m3fn, [R, C]) and `scale_inv`
(float32, [ceil(R / br), ceil(C / bc)]), one scale per br x bc block; the last block of a row
or column of blocks may be partial. W = q.float() * scale_inv[i // br, j // bc].

The loader dequantises every such weight once, at load time, into the compute dtype, so the
model never sees fp8. The generator quantises with scale = amax / 448 per block (448 is the
largest finite e4m3 value), DeepSeek's rule.
"""

from __future__ import annotations

import math

import torch

from services.common.errors import CheckpointError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # `weight` -> `weight_scale_inv`, as in DeepSeek's checkpoints


def scale_key(key: str) -> str:
    return key + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    # [R/br, C/bc] -> [R, C]: each scale repeated over its block, the partial last blocks cut.
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               name: str, scale_name: str | None = None) -> torch.Tensor:
    """W as float32. A scale that is mis-shaped or not finite fails the load, naming the
    tensors (`scale_name` defaults to `name` + "_scale_inv"): serving on would give a silently
    corrupted model."""
    scale_name = scale_key(name) if scale_name is None else scale_name
    if weight.dtype != FP8_DTYPE:
        raise CheckpointError(f"tensor {name!r} is {weight.dtype}, expected {FP8_DTYPE}")
    if weight.dim() != 2:
        raise CheckpointError(f"tensor {name!r}: fp8 weights must be 2-D, got {tuple(weight.shape)}")
    want = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"tensor {scale_name!r} has shape {tuple(scale_inv.shape)}, expected {want} "
            f"(weight {tuple(weight.shape)} in {block[0]}x{block[1]} blocks)"
        )
    if not scale_inv.is_floating_point():
        raise CheckpointError(f"tensor {scale_name!r} is {scale_inv.dtype}, not a float")
    scale = scale_inv.float()
    bad = ~torch.isfinite(scale)
    if bad.any():
        block_row, block_col = (int(i) for i in bad.nonzero()[0])
        raise CheckpointError(
            f"tensor {scale_name!r} holds {int(bad.sum())} non-finite scale(s), "
            f"first at block ({block_row}, {block_col})"
        )
    return weight.float() * _expand(scale, tuple(weight.shape), block)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale_inv) with scale_inv = amax / 448 per block; an all-zero block gets scale 0."""
    if weight.dim() != 2:
        raise ValueError(f"fp8 quantisation needs a 2-D weight, got {tuple(weight.shape)}")
    w = weight.float()
    rows, cols = w.shape
    grid = scale_shape((rows, cols), block)
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = w
    amax = padded.abs().view(grid[0], block[0], grid[1], block[1]).amax(dim=(1, 3))
    scale_inv = amax / FP8_MAX
    divisor = _expand(torch.where(scale_inv > 0, scale_inv, 1.0), (rows, cols), block)
    # w / (amax / 448) can round a hair past 448; clamp rather than rely on how the cast
    # treats out-of-range values (saturate or NaN differ between float8 conversions).
    q = (w / divisor).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv
