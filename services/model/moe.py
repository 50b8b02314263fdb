"""Mixture-of-experts: the gate (router), a bank of routed experts, and the MoE block.

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
_HAS_GROUPED_MM = hasattr(F, "grouped_mm") and torch.torch_version.TorchVersion(torch.__version__) >= (2, 11)


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
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.experts_per_group)
            if cfg.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            keep = keep.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
            choice = choice.masked_fill(~keep, float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
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
        # "auto": on a CPU, one grouped matmul over the experts when torch has it, else a loop
        # over experts; on a GPU, a gathered batched matmul for few tokens per expert (decode),
        # else the loop. "loop" / "gather" / "grouped" force one path (tests compare them).
        self.mode = "auto"

    def __len__(self) -> int:
        return len(self.keys)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; keys [T, K] (entries not held here, or -1, are skipped); weights [T, K].

        Returns the fp32 weighted sum [T, H] over the held experts each token selected.
        """
        T = x.shape[0]
        out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
        if not len(self) or T == 0:
            return out
        flat = keys.reshape(-1)
        in_range = (flat >= 0) & (flat < self.local_index.numel())
        local = torch.full_like(flat, -1)
        local[in_range] = self.local_index[flat[in_range]]
        held = (local >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return out
        local_held = local[held]
        token_of_entry = held // keys.shape[1]
        entry_weights = weights.reshape(-1)[held].float()
        counts = torch.bincount(local_held, minlength=len(self))
        self.token_counts += counts
        mode = self.mode
        if mode == "auto":
            if x.is_cuda:
                # Few tokens per expert (decode) is cheaper as one batched matmul than as a
                # kernel launch per expert; on a CPU the gather's weight copy costs what it saves.
                few = held.numel() < 4 * int((counts > 0).sum())
                mode = "gather" if few else "loop"
            else:
                mode = "grouped" if _HAS_GROUPED_MM else "loop"
        if mode == "gather":
            y = self._gathered(x, token_of_entry, local_held)
            out.index_add_(0, token_of_entry, y.float() * entry_weights[:, None])
            return out
        # Entries sorted by expert (stable, so each expert's rows stay in token order).
        order = torch.argsort(local_held, stable=True)
        rows, w = token_of_entry[order], entry_weights[order]
        if mode == "grouped":
            y = self._grouped(x[rows], counts)
            # In expert order, as the loop adds them: the sums round the same way.
            out.index_add_(0, rows, y.float() * w[:, None])
            return out
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            r, w_e = rows[start : start + n], w[start : start + n]
            start += n
            gate, up = F.linear(x[r], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down[e])
            # rows are distinct within one expert; index_put_ is the cheapest scatter-add on CPU
            out.index_put_((r,), y.float() * w_e[:, None], accumulate=True)
        return out

    def _grouped(self, h: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """h [N, H]: entries sorted by expert, counts[e] of them for expert e. One grouped
        matmul per projection: the per-expert loop runs in C++, not Python, and each group is
        the same matmul the loop would do. Returns [N, H] in h's dtype."""
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(h, self.gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offs)

    def _gathered(self, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Few tokens per expert (decode): one batched matmul over (token, expert) entries
        instead of a Python loop over experts. Returns [entries, H] in x's dtype."""
        h = x[rows].unsqueeze(-1)  # [N, H, 1]
        gate, up = torch.bmm(self.gate_up[experts], h).squeeze(-1).chunk(2, dim=-1)
        act = (F.silu(gate) * up).unsqueeze(-1)  # [N, I, 1]
        return torch.bmm(self.down[experts], act).squeeze(-1)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, expert_keys: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = ExpertBank(expert_keys, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias)
            if cfg.n_shared_experts
            else None
        )

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.shared_experts(x) if self.shared_experts is not None else None

    @staticmethod
    def combine(routed: torch.Tensor, shared: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        out = routed.to(dtype)
        return out + shared if shared is not None else out

    def forward(self, x: torch.Tensor, routed_fn: RoutedFn | None = None) -> torch.Tensor:
        weights, ids = self.gate(x)
        routed = (routed_fn or self.experts)(x, ids, weights)
        return self.combine(routed, self.shared(x), x.dtype)
