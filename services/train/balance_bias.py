"""DeepSeek-V3's auxiliary-loss-free load balancing: the gate's per-expert correction bias.

The sigmoid gate chooses experts by score + bias (services/model/moe.py Gate); the bias takes no
gradient. After each training step it is nudged against the step's load: every expert that
took more tokens than the mean loses gamma, every one that took fewer gains gamma (DeepSeek-V3
report, section 2.1.2: b_i += gamma * sign(mean_load - load_i)). An expert at exactly the mean
is left alone (sign 0). The bias only steers the choice; the weights still come from the
unbiased scores.
"""

from __future__ import annotations

import torch

# DeepSeek-V3 used 0.001 for most of its training.
DEFAULT_GAMMA = 1e-3


def update_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float = DEFAULT_GAMMA) -> torch.Tensor:
    """The next bias [E] (a new tensor) from this step's per-expert token counts load [E]."""
    if bias.shape != load.shape:
        raise ValueError(f"bias {tuple(bias.shape)} and load {tuple(load.shape)} differ in shape")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    load = load.to(torch.float64)
    step = torch.sign(load.mean() - load).to(bias.dtype)
    return bias + gamma * step


def balancedness(load: torch.Tensor) -> float:
    """mean / max of the per-expert load (1.0 is perfectly even), the demo's figure."""
    load = load.to(torch.float64)
    top = float(load.max())
    return float(load.mean()) / top if top > 0 else 1.0
