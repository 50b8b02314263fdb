"""An EP rank's work, free of gRPC: validate a dispatch, run the grouped SwiGLU, count load."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from services.balance.placement import PlacementTable
from services.common.errors import StatusError
from services.engine.wire import WireError, WireTensor, decode, encode
from services.model.config import ModelConfig
from services.model.moe import ExpertBank


class DispatchRejected(StatusError):
    """A dispatch this worker cannot run (stale placement, unknown layer, bad tensors); the
    reply carries the code in-band so the stream stays open."""


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


@dataclass
class _Placement:
    """The slots one placement version assigns to this rank, with their weights."""

    table: PlacementTable
    banks: dict[int, ExpertBank]
    held: dict[int, np.ndarray]  # layer -> bool per slot id, held here; the last entry False
    last_used: float


class ExpertWorkerCore:
    """Serves one or more placement versions at once: during a rebalance the new version's
    slots are loaded while the old one keeps serving, and attention instances switch at their
    own step boundaries, so both are live for a moment. The newest version is the one this
    worker advertises; older ones are released once unused (see release_unused)."""

    def __init__(self, cfg: ModelConfig, rank: int, table: PlacementTable,
                 banks: dict[int, ExpertBank], device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.cfg, self.rank = cfg, rank
        self.device, self.dtype = torch.device(device), dtype
        self.placements: dict[int, _Placement] = {}
        self._released: dict[int, list[int]] = {}  # load counted by versions since released
        self.add_placement(table, banks)

    def add_placement(self, table: PlacementTable, banks: dict[int, ExpertBank]) -> None:
        held = {}
        for layer, bank in banks.items():
            held[layer] = np.zeros(max(bank.keys, default=-1) + 2, dtype=bool)
            held[layer][list(bank.keys)] = True
        self.placements[table.version] = _Placement(table, banks, held, time.monotonic())

    def release_unused(self, idle_s: float, now: float | None = None) -> list[int]:
        """Drops every version older than the newest that has served nothing for `idle_s`."""
        now = time.monotonic() if now is None else now
        newest = self.placement_version
        gone = [v for v, p in self.placements.items()
                if v != newest and now - p.last_used >= idle_s]
        for version in gone:
            for layer, row in self._logical_counts([self.placements.pop(version)]).items():
                kept = self._released.setdefault(layer, [0] * len(row))
                self._released[layer] = [a + b for a, b in zip(kept, row, strict=True)]
        return gone

    @property
    def placement_version(self) -> int:
        return max(self.placements)

    @property
    def versions(self) -> list[int]:
        return sorted(self.placements)

    @property
    def table(self) -> PlacementTable:
        return self.placements[self.placement_version].table

    @property
    def banks(self) -> dict[int, ExpertBank]:
        return self.placements[self.placement_version].banks

    def check_header(self, placement_version: int, layer_id: int) -> None:
        """Checks that need no tensor: a stale placement fails before any decoding."""
        if placement_version not in self.placements:
            raise DispatchRejected(
                "FAILED_PRECONDITION",
                f"placement version {placement_version} is not served by this worker "
                f"(serves {self.versions})")
        if layer_id not in self.placements[placement_version].banks:
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
            slots = decode(inp.slots)
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
        # an attention instance never sends these; computing on them would only spread NaN
        if not (_all_finite(hidden) and _all_finite(weights)):
            raise bad("hidden states and gate weights must be finite")
        self._check_slots(slots.numpy(), inp, bad)
        return hidden, slots.long(), weights

    def _check_slots(self, slots: np.ndarray, inp: DispatchInput, bad) -> None:
        """Every slot is -1 (held elsewhere) or held here. In numpy: at every dispatch, on a
        few dozen ids, torch's per-op cost was most of the validation's time."""
        held = self.placements[inp.placement_version].held[inp.layer_id]
        used = slots[slots >= 0]
        foreign = used[~held[np.minimum(used, held.size - 1)]]  # beyond the mask: its last, False
        if foreign.size or (slots.size and slots.min() < -1):
            shown = int(foreign.min()) if foreign.size else int(slots.min())
            raise bad(f"slot {shown} of layer {inp.layer_id} is not held by rank {self.rank}")

    @torch.inference_mode()  # no autograd bookkeeping: it doubled the cost of small dispatches
    def run(self, inp: DispatchInput) -> DispatchOutput:
        """Validate and compute (call from the compute thread)."""
        hidden, slots, weights = self.validate(inp)
        t0 = time.perf_counter()
        placement = self.placements.get(inp.placement_version)
        if placement is None:  # released between the header check and now
            raise DispatchRejected("FAILED_PRECONDITION",
                                   f"placement version {inp.placement_version} was released")
        placement.last_used = time.monotonic()
        bank = placement.banks[inp.layer_id]
        out = bank(hidden.to(self.device), slots.to(self.device), weights.to(self.device))
        combined = encode(out, inp.combine_dtype)
        return DispatchOutput(combined, time.perf_counter() - t0)

    @torch.inference_mode()
    def warm_up(self, banks: dict[int, ExpertBank] | None = None) -> None:
        """One token through every held expert of every layer, then reset the counters."""
        for bank in (self.banks if banks is None else banks).values():
            if not len(bank):
                continue
            keys = torch.tensor(bank.keys, dtype=torch.long, device=self.device)
            x = torch.zeros(len(bank), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            ids = torch.full((len(bank), self.cfg.num_experts_per_tok), -1, device=self.device)
            ids[:, 0] = keys
            bank(x, ids, torch.ones(ids.shape, device=self.device))
            bank.token_counts.zero_()

    def load(self, reset: bool = False) -> dict[int, tuple[list[int], list[int]]]:
        """layer -> (slots, tokens routed to each) since the last reset, newest version."""
        out = {}
        for layer, bank in self.banks.items():
            out[layer] = (list(bank.keys), bank.token_counts.tolist())
            if reset:
                bank.token_counts.zero_()
        return out

    def logical_load(self) -> dict[int, list[int]]:
        """layer -> tokens per logical expert, summed over every version's slots since start
        (cumulative: a reporter sends differences)."""
        out = self._logical_counts(list(self.placements.values()))
        for layer, row in self._released.items():
            out[layer] = [a + b for a, b in zip(out.get(layer, [0] * len(row)), row, strict=True)]
        return out

    def _logical_counts(self, placements: list[_Placement]) -> dict[int, list[int]]:
        n = self.cfg.n_routed_experts
        out: dict[int, list[int]] = {}
        for placement in placements:
            for layer, bank in placement.banks.items():
                row = out.setdefault(layer, [0] * n)
                phy2log = placement.table.phy2log[placement.table.layer_index(layer)]
                for slot, count in zip(bank.keys, bank.token_counts.tolist(), strict=True):
                    row[phy2log[slot]] += count
        return out


def _all_finite(t: torch.Tensor) -> bool:
    """In numpy where it can: on a dispatch's few thousand values torch.isfinite's per-call
    cost was most of the validation's time (14 us a call against numpy's 3)."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())
