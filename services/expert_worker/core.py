"""An EP rank's work, free of gRPC: validate a dispatch, run the grouped SwiGLU, count load."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from services.balance.placement import PlacementTable
from services.engine.wire import WireError, WireTensor, decode, encode
from services.model.config import ModelConfig
from services.model.moe import ExpertBank


class DispatchRejected(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class DispatchInput:
    step_id: int
    micro_batch: int
    layer_id: int
    placement_version: int
    hidden: WireTensor
    slots: WireTensor
    weights: WireTensor
    combine_dtype: str


@dataclass(frozen=True)
class DispatchOutput:
    combined: WireTensor
    compute_seconds: float


class ExpertWorkerCore:
    def __init__(self, cfg: ModelConfig, rank: int, table: PlacementTable,
                 banks: dict[int, ExpertBank], device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.rank, self.table = cfg, rank, table
        self.banks, self.device, self.dtype = banks, torch.device(device), dtype
        self.held = {layer: set(bank.keys) for layer, bank in banks.items()}

    @property
    def placement_version(self) -> int:
        return self.table.version

    def check_header(self, placement_version: int, layer_id: int) -> None:
        """Checks that need no tensor: a stale placement fails before any decoding."""
        if placement_version != self.table.version:
            raise DispatchRejected(
                "FAILED_PRECONDITION",
                f"placement version {placement_version} is not this worker's {self.table.version}")
        if layer_id not in self.banks:
            raise DispatchRejected(
                "INVALID_ARGUMENT",
                f"layer {layer_id} is not a MoE layer (MoE layers: {sorted(self.banks)})")

    def validate(self, inp: DispatchInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def bad(msg: str) -> DispatchRejected:
            return DispatchRejected("INVALID_ARGUMENT", msg)

        self.check_header(inp.placement_version, inp.layer_id)
        if inp.hidden.dtype not in ("fp32", "bf16", "fp8"):
            raise bad(f"hidden dtype {inp.hidden.dtype!r} is not fp32, bf16 or fp8")
        if inp.combine_dtype not in ("fp32", "bf16"):
            raise bad(f"combine dtype {inp.combine_dtype!r} is not fp32 or bf16")
        if inp.slots.dtype != "int32" or inp.weights.dtype != "fp32":
            raise bad("slots must be int32 and weights fp32")
        try:
            hidden = decode(inp.hidden, self.dtype)
            slots = decode(inp.slots).long()
            weights = decode(inp.weights)
        except WireError as exc:
            raise bad(str(exc)) from exc
        k = self.cfg.num_experts_per_tok
        if hidden.dim() != 2 or hidden.shape[1] != self.cfg.hidden_size:
            raise bad(f"hidden must be [N, {self.cfg.hidden_size}], got {list(hidden.shape)}")
        n = hidden.shape[0]
        if tuple(slots.shape) != (n, k) or tuple(weights.shape) != (n, k):
            raise bad(f"slots and weights must be [{n}, {k}], got {list(slots.shape)} "
                      f"and {list(weights.shape)}")
        used = set(slots[slots >= 0].unique().tolist())
        foreign = sorted(used - self.held[inp.layer_id])
        if foreign or (slots < -1).any():
            shown = foreign[0] if foreign else int(slots.min())
            raise bad(f"slot {shown} of layer {inp.layer_id} is not held by rank {self.rank}")
        return hidden, slots, weights

    def run(self, inp: DispatchInput) -> DispatchOutput:
        """Validate and compute (call from the compute thread)."""
        hidden, slots, weights = self.validate(inp)
        t0 = time.perf_counter()
        bank = self.banks[inp.layer_id]
        out = bank(hidden.to(self.device), slots.to(self.device), weights.to(self.device))
        combined = encode(out, inp.combine_dtype)
        return DispatchOutput(combined, time.perf_counter() - t0)

    def warm_up(self) -> None:
        """One token through every held expert of every layer, then reset the counters."""
        for bank in self.banks.values():
            if not len(bank):
                continue
            keys = torch.tensor(bank.keys, dtype=torch.long, device=self.device)
            x = torch.zeros(len(bank), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            ids = torch.full((len(bank), self.cfg.num_experts_per_tok), -1, device=self.device)
            ids[:, 0] = keys
            bank(x, ids, torch.ones(ids.shape, device=self.device))
            bank.token_counts.zero_()

    def load(self, reset: bool = False) -> dict[int, tuple[list[int], list[int]]]:
        """layer -> (slots, tokens routed to each) since the last reset."""
        out = {}
        for layer, bank in self.banks.items():
            out[layer] = (list(bank.keys), bank.token_counts.tolist())
            if reset:
                bank.token_counts.zero_()
        return out
