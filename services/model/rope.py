"""Rotary position embedding with optional YaRN scaling, as DeepSeek-V2/V3 configure it.

Interleaved rotary (DeepSeek's native layout) rotates adjacent pairs (x0, x1), (x2, x3), ...;
the non-interleaved form rotates (x_i, x_{i+d/2}). Outputs are laid out as
[rotated evens | rotated odds] in the interleaved case: q and k share the layout, so their dot
products, the only thing attention uses, equal the native ones.
"""

from __future__ import annotations

import math

import torch

from services.model.config import RopeConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(rope: RopeConfig, qk_head_dim: int) -> float:
    """Attention softmax scale; YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
    scale = qk_head_dim**-0.5
    if rope.kind == "yarn" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [dim/2] and the cos/sin amplitude (YaRN attention factor)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    pos_freqs = rope.theta**exponents
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for positions; apply() rotates the rope part of q or k."""

    def __init__(self, rope: RopeConfig, dim: int, interleave: bool) -> None:
        self.inv_freq, self.amplitude = inverse_frequencies(rope, dim)
        self.interleave = interleave

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, dim/2] in fp32."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return freqs.cos() * self.amplitude, freqs.sin() * self.amplitude

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim]; cos/sin [T, dim/2] broadcast over the middle axes."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
        else:
            half = xf.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
