"""ExpertWorkerCore serving several placement versions, and the LoadReporter built on it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.balance.naive import contiguous_placement
from services.balance.placement import PlacementTable
from services.engine.wire import decode, encode
from services.expert_worker.core import DispatchInput, DispatchRejected, ExpertWorkerCore
from services.expert_worker.rollout import LoadReporter
from services.model.config import ModelConfig
from services.model.moe import ExpertBank
from services.model.presets import PRESETS
from services.scheduler.rebalance import LoadWindow

CFG = ModelConfig.from_dict(PRESETS["tiny"])  # MoE layers (1, 2), 16 experts, top-4, H 64
LAYERS = CFG.moe_layer_ids
E, K, H = CFG.n_routed_experts, CFG.num_experts_per_tok, CFG.hidden_size
REDUNDANT = 4  # one worker: 20 slots, slots 16..19 copy experts (v1) 0..3, (v2) 15..12


def v1_table() -> PlacementTable:
    return contiguous_placement(E, 1, LAYERS, redundant=REDUNDANT, version=1)


def v2_table(version: int = 2) -> PlacementTable:
    loads = np.tile(np.arange(E, dtype=np.float64), (len(LAYERS), 1))  # 15 heaviest
    return contiguous_placement(E, 1, LAYERS, redundant=REDUNDANT, loads=loads, version=version)


def make_banks(table: PlacementTable, seed: int, rank: int = 0) -> dict[int, ExpertBank]:
    gen = torch.Generator().manual_seed(seed)
    banks = {}
    for layer in table.layer_ids:
        bank = ExpertBank(list(table.slots_of_worker(rank)), H, CFG.moe_intermediate_size)
        with torch.no_grad():
            bank.gate_up.copy_(torch.randn(bank.gate_up.shape, generator=gen) * 0.1)
            bank.down.copy_(torch.randn(bank.down.shape, generator=gen) * 0.1)
        banks[layer] = bank
    return banks


def make_core() -> ExpertWorkerCore:
    return ExpertWorkerCore(CFG, 0, v1_table(), make_banks(v1_table(), seed=1))


def dispatch(version: int, slots: list[list[int]], layer: int = 1, seed: int = 0
             ) -> DispatchInput:
    rows = [row + [-1] * (K - len(row)) for row in slots]
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(rows), H, generator=gen)
    weights = torch.rand(len(rows), K, generator=gen)
    return DispatchInput(step_id=1, micro_batch=0, layer_id=layer, placement_version=version,
                         hidden=encode(hidden, "fp32"),
                         slots=encode(torch.tensor(rows, dtype=torch.int32), "int32"),
                         weights=encode(weights, "fp32"), combine_dtype="fp32")


def reference(bank: ExpertBank, inp: DispatchInput) -> torch.Tensor:
    """The weighted SwiGLU sum, one token and one slot at a time."""
    x, slots, weights = decode(inp.hidden), decode(inp.slots).long(), decode(inp.weights)
    out = torch.zeros(x.shape)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for k in range(K):
                slot = int(slots[t, k])
                if slot < 0:
                    continue
                i = bank.keys.index(slot)
                gate, up = F.linear(x[t], bank.gate_up[i]).chunk(2)
                out[t] += weights[t, k] * F.linear(F.silu(gate) * up, bank.down[i])
    return out


def logical(core: ExpertWorkerCore, layer: int) -> list[int]:
    return core.logical_load()[layer]


# ---- versions -----------------------------------------------------------------------------------


def test_tables_differ_in_their_redundant_slots():
    # The premise of the mapping tests below.
    assert v1_table().phy2log[0][16:] == (0, 1, 2, 3)
    assert v2_table().phy2log[0][16:] == (15, 14, 13, 12)


def test_the_newest_version_is_the_one_advertised():
    core = make_core()
    assert (core.placement_version, core.versions) == (1, [1])
    v2_banks = make_banks(v2_table(), seed=2)
    core.add_placement(v2_table(), v2_banks)
    assert (core.placement_version, core.versions) == (2, [1, 2])
    assert core.table.version == 2 and core.banks is v2_banks


def test_check_header_rejects_an_unknown_version_naming_the_versions_served():
    core = make_core()
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    core.check_header(1, 1)
    core.check_header(2, 2)
    with pytest.raises(DispatchRejected) as err:
        core.check_header(3, 1)
    assert err.value.code == "FAILED_PRECONDITION"
    assert "3" in err.value.message and "[1, 2]" in err.value.message
    with pytest.raises(DispatchRejected) as err:
        core.check_header(2, 0)  # layer 0 is dense
    assert err.value.code == "INVALID_ARGUMENT"


def test_both_live_versions_compute_with_their_own_weights():
    core = make_core()
    v1_banks = core.banks
    v2_banks = make_banks(v2_table(), seed=2)
    core.add_placement(v2_table(), v2_banks)
    slots = [[0, 16, 5], [7, 19], [16]]
    old = core.run(dispatch(1, slots))
    new = core.run(dispatch(2, slots))
    assert old.combined.dtype == "fp32" and old.combined.shape == (3, H)
    torch.testing.assert_close(decode(old.combined), reference(v1_banks[1], dispatch(1, slots)),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decode(new.combined), reference(v2_banks[1], dispatch(2, slots)),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(decode(old.combined), decode(new.combined))
    # Each version counted only what it served.
    assert v1_banks[1].token_counts.sum() == 6 and v2_banks[1].token_counts.sum() == 6
    assert v1_banks[2].token_counts.sum() == 0


def test_a_released_version_is_rejected_before_decoding():
    core = make_core()
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    assert core.release_unused(idle_s=10, now=time.monotonic() + 20) == [1]
    assert core.versions == [2]
    with pytest.raises(DispatchRejected) as err:
        core.run(dispatch(1, [[0]]))
    assert err.value.code == "FAILED_PRECONDITION" and "[2]" in err.value.message
    core.run(dispatch(2, [[0]]))  # the new version still serves


def test_release_unused_drops_only_older_idle_versions():
    core = make_core()
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    core.add_placement(v2_table(version=3), make_banks(v2_table(version=3), seed=3))
    for placement in core.placements.values():
        placement.last_used = 0.0
    assert core.release_unused(idle_s=100, now=50.0) == []  # nothing idle long enough
    core.placements[1].last_used = 40.0  # v1 served recently, v2 did not
    assert core.release_unused(idle_s=30, now=60.0) == [2]
    assert core.versions == [1, 3]
    # The newest is never released, however long it has been idle.
    assert core.release_unused(idle_s=30, now=1e9) == [1]
    assert core.versions == [3] and core.placement_version == 3


def test_serving_a_version_keeps_it_from_being_released():
    core = make_core()
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    core.placements[1].last_used = 0.0
    core.run(dispatch(1, [[3]]))  # marks v1 used now
    assert core.release_unused(idle_s=60, now=time.monotonic() + 1) == []
    assert core.versions == [1, 2]


# ---- logical load -------------------------------------------------------------------------------


def test_logical_load_sums_the_slots_of_one_expert():
    core = make_core()
    # Slots 0 and 16 both hold expert 0 in v1; slot 5 holds expert 5.
    core.run(dispatch(1, [[0, 16], [0, 5], [16]]))
    row = logical(core, 1)
    assert row[0] == 4 and row[5] == 1 and sum(row) == 5
    assert logical(core, 2) == [0] * E
    assert len(row) == E


def test_logical_load_maps_each_version_by_its_own_table_and_survives_release():
    core = make_core()
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    core.run(dispatch(1, [[16]]))  # v1: slot 16 is expert 0
    core.run(dispatch(2, [[16], [17]], layer=2))  # v2: slots 16, 17 are experts 15, 14
    core.run(dispatch(2, [[16]]))
    before = core.logical_load()
    assert before[1][0] == 1 and before[1][15] == 1 and sum(before[1]) == 2
    assert before[2][15] == 1 and before[2][14] == 1 and sum(before[2]) == 2
    assert core.release_unused(idle_s=1, now=time.monotonic() + 10) == [1]
    assert core.logical_load() == before  # v1's load is kept after its slots are freed
    core.run(dispatch(2, [[0, 16]]))
    after = core.logical_load()
    assert after[1][0] == 2 and after[1][15] == 2


# ---- LoadReporter -------------------------------------------------------------------------------


def test_the_first_report_is_everything_so_far_flattened_by_layer():
    core = make_core()
    reporter = LoadReporter(None, core, 1.0)
    assert reporter.report() is None  # nothing routed yet
    core.run(dispatch(1, [[0, 16], [5]]))
    core.run(dispatch(1, [[15]], layer=2))
    msg = reporter.report()
    assert msg is not None
    assert (msg.rank, msg.placement_version, msg.num_logical_experts) == (0, 1, E)
    assert list(msg.layer_ids) == [1, 2]
    expected = [0] * (2 * E)
    expected[0], expected[5], expected[E + 15] = 2, 1, 1
    assert list(msg.logical_tokens) == expected
    assert msg.window_end >= msg.window_start


def test_later_reports_carry_only_the_difference():
    core = make_core()
    reporter = LoadReporter(None, core, 1.0)
    core.run(dispatch(1, [[0], [1]]))
    assert reporter.report() is not None
    assert reporter.report() is None  # nothing changed since
    core.run(dispatch(1, [[1, 16]]))
    msg = reporter.report()
    expected = [0] * (2 * E)
    expected[0], expected[1] = 1, 1  # slot 16 is expert 0
    assert list(msg.logical_tokens) == expected


def test_a_release_neither_repeats_nor_loses_load():
    core = make_core()
    reporter = LoadReporter(None, core, 1.0)
    core.add_placement(v2_table(), make_banks(v2_table(), seed=2))
    core.run(dispatch(1, [[2]]))
    reporter.report()
    core.run(dispatch(1, [[3]]))  # served by v1 after the report, then v1 is released
    core.release_unused(idle_s=1, now=time.monotonic() + 10)
    msg = reporter.report()
    assert list(msg.logical_tokens) == [0, 0, 0, 1] + [0] * (2 * E - 4)
    assert msg.placement_version == 2
    assert reporter.report() is None


def test_a_counter_reset_does_not_break_the_reporter():
    # The Load RPC may reset the newest version's counters; the report must stay valid
    # (logical_tokens is uint64: a negative difference would raise and stop the reporter).
    core = make_core()
    reporter = LoadReporter(None, core, 1.0)
    core.run(dispatch(1, [[0], [0], [0]]))
    reporter.report()
    core.load(reset=True)
    core.run(dispatch(1, [[0]]))
    msg = reporter.report()
    assert msg is not None and min(msg.logical_tokens) >= 0
    assert msg.logical_tokens[0] == 1


def test_reports_feed_the_scheduler_window():
    core = make_core()
    reporter = LoadReporter(None, core, 1.0)
    core.run(dispatch(1, [[0, 16, 7]]))
    window = LoadWindow(30, LAYERS, E)
    window.add(reporter.report(), now=0.0)
    core.run(dispatch(1, [[7]], layer=2))
    window.add(reporter.report(), now=1.0)
    loads = window.loads(1.0)
    assert loads[0, 0] == 2 and loads[0, 7] == 1 and loads[1, 7] == 1 and loads.sum() == 4


def test_slot_checks_name_the_first_slot_not_held_here():
    """Rank 0 of two holds slots 0..9 of 20: -1 is "held elsewhere", 10 and 25 are not its,
    -2 is no slot at all; each rejection names the offending slot."""
    table = contiguous_placement(E, 2, LAYERS, redundant=REDUNDANT, version=1)
    core = ExpertWorkerCore(CFG, 0, table, make_banks(table, seed=1))
    hidden, slots, _ = core.validate(dispatch(1, [[0, 9, -1], [3]]))
    assert slots.dtype == torch.long and slots.tolist()[0][:3] == [0, 9, -1]
    for bad, shown in (([[0, 12]], 12), ([[25, 10]], 10), ([[1, -2]], -2), ([[-2, 11]], 11)):
        with pytest.raises(DispatchRejected, match=f"slot {shown} of layer 1 is not held"):
            core.validate(dispatch(1, bad))
