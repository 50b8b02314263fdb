"""Mixture-of-experts: the gate (router), a bank of routed experts, and the MoE block's parts.

Which routed experts a process holds is explicit: an ExpertBank is built for a list of keys.
The reference engine keys experts by logical id; an expert worker keys them by physical slot
(a logical expert replicated on two workers has two slots). Partial sums are accumulated in
fp32 so that splitting experts across processes changes results only by rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from services.model.config import ModelConfig
from services.model.layers import SwiGLU

# (x [T, H], expert ids [T, K], weights [T, K] fp32) -> routed output [T, H] fp32
RoutedFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# F.grouped_mm's CPU kernel (a C++ loop of one matmul per group) exists from torch 2.9; up to
# 2.10 it also needs 16-byte-aligned operands, which memory-mapped checkpoints don't guarantee.
HAS_GROUPED_MM = (hasattr(F, "grouped_mm")
                  and torch.torch_version.TorchVersion(torch.__version__) >= (2, 11))


# On a CPU, the grouped matmul pays a fixed cost for every expert held, hit or not (~7 us
# each), the loop ~80 us of dispatch for every expert hit: the loop wins while fewer than
# 1/LOOP_HIT_RATIO of the held experts are hit (measured on v3-mini, 256 experts: 0.74 vs
# 2.4 ms at 8 hit, 4.8 vs 4.6 ms at 59; both paths give the same bits).
LOOP_HIT_RATIO = 6


class Gate(nn.Module):
    """Scores every expert, limits the choice to topk_group groups, returns top-k ids and weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32))
        self.use_bias = cfg.topk_method == "noaux_tc"
        if self.use_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32))
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, K] fp32, ids [T, K] long)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())  # [T, E], always fp32
        if cfg.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.use_bias else scores
        k = cfg.num_experts_per_tok
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            per = cfg.experts_per_group
            grouped = choice.view(-1, cfg.n_group, per)
            if cfg.topk_method == "noaux_tc":
                # Sum of each group's two best scores. Equal to topk(2).sum(), but topk is a
                # branchy partial sort that costs more than the matmuls of the gate in prefill.
                best, at = grouped.max(dim=-1)
                second = grouped.scatter(-1, at.unsqueeze(-1), float("-inf")).amax(dim=-1)
                group_scores = best + second
            else:
                group_scores = grouped.amax(dim=-1)
            group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]  # [T, G]
            # The top k among the kept groups' experts only (the others can't be chosen).
            kept = grouped.gather(1, group_idx.unsqueeze(-1).expand(-1, -1, per))  # [T, G, per]
            j = kept.flatten(1).topk(k, dim=-1, sorted=False)[1]
            ids = group_idx.gather(1, j // per) * per + j % per
        else:
            ids = choice.topk(k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


class ExpertBank(nn.Module):
    """SwiGLU experts stacked by key: gate_up [n, 2I, H], down [n, H, I]."""

    def __init__(self, keys: Sequence[int], hidden: int, intermediate: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.keys = tuple(int(k) for k in keys)
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("expert keys must be unique")
        n = len(self.keys)
        self.gate_up = nn.Parameter(torch.empty(n, 2 * intermediate, hidden, dtype=dtype))
        self.down = nn.Parameter(torch.empty(n, hidden, intermediate, dtype=dtype))
        size = max(self.keys, default=-1) + 1
        local = torch.full((size,), -1, dtype=torch.long, device="cpu")
        if n:
            local[torch.tensor(self.keys, device="cpu")] = torch.arange(n, device="cpu")
        self.register_buffer("local_index", local, persistent=False)
        self.register_buffer("token_counts", torch.zeros(n, dtype=torch.long, device="cpu"), persistent=False)
        # "auto": on a CPU, a loop over the experts hit when they are few next to the experts
        # held (decode), else one grouped matmul over the experts when torch has it; on a GPU,
        # a gathered batched matmul for few tokens per expert (decode), else the loop.
        # "loop" / "gather" / "grouped" force one path (tests compare them).
        self.mode = "auto"

    def __len__(self) -> int:
        return len(self.keys)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; keys [T, K] (entries not held here, or -1, are skipped); weights [T, K].

        Returns the fp32 weighted sum [T, H] over the held experts each token selected.
        """
        (T, H), K = x.shape, keys.shape[1]
        if not len(self) or T == 0:
            return torch.zeros(T, H, dtype=torch.float32, device=x.device)
        # (Gathers use index_select: several times cheaper than advanced indexing on a CPU.)
        flat, size = keys.reshape(-1), self.local_index.numel()
        local = self.local_index.index_select(0, flat.clamp(0, size - 1))
        local = torch.where((flat >= 0) & (flat < size), local, -1)  # -1: not held here
        held = (local >= 0).nonzero().squeeze(1)  # entries (token * K + k) held here
        if held.numel() == 0:
            return torch.zeros(T, H, dtype=torch.float32, device=x.device)
        experts = local.index_select(0, held)
        counts = torch.bincount(experts, minlength=len(self))
        self.token_counts += counts
        # Entries grouped by expert (stable, so each expert's rows stay in token order).
        order = torch.argsort(experts, stable=True)
        entries, experts = held.index_select(0, order), experts.index_select(0, order)
        h = x.index_select(0, entries // K)
        mode = self.mode
        if mode == "auto":
            if x.is_cuda:
                # Few tokens per expert (decode) is cheaper as one batched matmul than as a
                # kernel launch per expert; on a CPU the gather's weight copy costs what it saves.
                few = held.numel() < 4 * int((counts > 0).sum())
                mode = "gather" if few else "loop"
            else:
                hit = int((counts > 0).sum())
                mode = "grouped" if HAS_GROUPED_MM and hit * LOOP_HIT_RATIO >= len(self) else "loop"
        if mode == "gather":
            y = self._gathered(h, experts)
        elif mode == "grouped":
            y = self._grouped(h, counts)
        else:
            y = self._looped(h, counts)
        # Combine in fp32: each entry's output goes back to its (token, k) row, zero where not
        # held here, and each token takes the weighted sum of its K rows as one [1, K] x [K, H]
        # product. No scatter-add, no weighted copy of the outputs, and a summation order that
        # does not depend on how the entries were grouped by expert.
        y = y.float()
        if held.numel() == T * K:  # all held (the reference engine): one gather puts them back
            position = torch.arange(entries.numel(), device=entries.device)
            contrib = y.index_select(0, torch.empty_like(entries).index_copy_(0, entries, position))
        else:
            contrib = torch.zeros(T * K, H, dtype=torch.float32, device=x.device)
            contrib.index_copy_(0, entries, y)
        return torch.bmm(weights.float().reshape(T, 1, K), contrib.view(T, K, H)).view(T, H)

    def _looped(self, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """h [N, H]: entries sorted by expert, counts[e] of them for expert e. One matmul pair
        per expert hit, from Python. Returns [N, H] in h's dtype."""
        y = torch.empty_like(h)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = F.linear(h[start : start + n], self.gate_up[e]).chunk(2, dim=-1)
                y[start : start + n] = F.linear(F.silu(gate) * up, self.down[e])
                start += n
        return y

    def _grouped(self, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """As _looped, but one grouped matmul per projection: the loop over experts runs in
        C++, and each group is the same matmul the loop would do."""
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(h, self.gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offs)

    def _gathered(self, h: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Few tokens per expert (decode) on a GPU: one batched matmul over the entries h [N, H]
        (entry i for local expert experts[i]), weights gathered per entry. Returns [N, H]."""
        gate, up = torch.bmm(self.gate_up[experts], h.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
        act = (F.silu(gate) * up).unsqueeze(-1)  # [N, I, 1]
        return torch.bmm(self.down[experts], act).squeeze(-1)


class MoE(nn.Module):
    """The parts of a MoE layer's FFN: gate, routed experts, shared experts. DecoderLayer runs
    them (its stages, services/model/deepseek.py), so the block's math is written once there."""

    def __init__(self, cfg: ModelConfig, expert_keys: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = ExpertBank(expert_keys, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias)
            if cfg.n_shared_experts
            else None
        )
