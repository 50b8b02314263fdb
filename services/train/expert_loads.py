"""Per-expert loads measured by running a model over text: real routing skew, per MoE layer.

What the serving system's balancers (EPLB, live rebalancing) are built for is skewed loads;
random weights route near-uniformly. These loads come from the trained demo model's gate over
its held-out plays and are stored with the checkpoint (expert_loads.json), so benchmarks and
tests read them without running the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.model.batch import contiguous_batch
from services.model.deepseek import DeepseekModel

LOADS_FILE = "expert_loads.json"


@dataclass(frozen=True)
class ExpertLoads:
    source: str  # what text was routed
    tokens: int  # tokens routed (each to num_experts_per_tok experts per layer)
    layers: dict[int, list[int]]  # MoE layer id -> tokens each logical expert took
    # the same counted over each part of the text on its own (e.g. one held-out play each):
    # loads that drift between workloads, to plan on one and evaluate on another
    parts: dict[str, ExpertLoads] = field(default_factory=dict)

    def matrix(self) -> list[list[int]]:
        """[layers, experts], layers in id order (the shape EPLB plans on)."""
        return [self.layers[k] for k in sorted(self.layers)]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "tokens": self.tokens,
                               "layers": {str(k): v for k, v in sorted(self.layers.items())}}
        if self.parts:
            out["parts"] = {name: part.to_dict() for name, part in sorted(self.parts.items())}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExpertLoads:
        return cls(raw["source"], int(raw["tokens"]),
                   {int(k): [int(x) for x in v] for k, v in raw["layers"].items()},
                   {name: cls.from_dict(part) for name, part in raw.get("parts", {}).items()})

    @classmethod
    def from_json(cls, text: str) -> ExpertLoads:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ExpertLoads:
        return cls.from_json((Path(model_dir) / LOADS_FILE).read_text())


def combine(parts: dict[str, ExpertLoads], source: str) -> ExpertLoads:
    """The loads of all parts together (counts add), keeping each part."""
    first = next(iter(parts.values()))
    layers = {k: [sum(p.layers[k][e] for p in parts.values()) for e in range(len(v))]
              for k, v in first.layers.items()}
    return ExpertLoads(source, sum(p.tokens for p in parts.values()), layers, dict(parts))


def measure(model: DeepseekModel, windows: torch.Tensor, source: str,
            batch_size: int = 16) -> ExpertLoads:
    """Route windows [N, S] (prefill, whole windows) and count each expert's tokens."""
    banks = model.expert_banks()
    for bank in banks.values():
        bank.token_counts.zero_()
    for i in range(0, windows.shape[0], batch_size):
        part = windows[i : i + batch_size]
        B, S = part.shape
        caches = [torch.zeros(B * S, model.cfg.latent_dim, dtype=model.dtype)
                  for _ in range(model.cfg.num_hidden_layers)]
        model(part.reshape(-1), contiguous_batch([0] * B, [S] * B, S), caches)
    layers = {}
    for layer, bank in sorted(banks.items()):
        counts = torch.zeros(model.cfg.n_routed_experts, dtype=torch.long)
        counts[torch.tensor(bank.keys)] = bank.token_counts
        layers[layer] = counts.tolist()
        bank.token_counts.zero_()
    return ExpertLoads(source, int(windows.numel()), layers)
