"""PlacementTable: validation, lookups, route() determinism and spread, JSON round trip."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.balance.placement import PlacementTable


def small_table(version: int = 1) -> PlacementTable:
    # 4 experts, 3 workers x 2 slots; expert 0 has 3 replicas, expert 3 has 1.
    return PlacementTable(
        version=version,
        num_workers=3,
        num_logical_experts=4,
        layer_ids=(3, 5),
        phy2log=((0, 1, 0, 2, 3, 0), (3, 2, 1, 0, 1, 1)),
    )


def test_geometry_and_lookups():
    table = small_table()
    assert table.num_slots == 6
    assert table.slots_per_worker == 2
    assert table.num_redundant == 2
    assert [table.worker_of_slot(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    assert table.slots_of_worker(2) == range(4, 6)
    assert table.logical_experts_on_worker(3, 1) == (0, 2)
    assert table.logical_experts_on_worker(5, 2) == (1,)
    assert table.replicas(3) == [[0, 2, 5], [1], [3], [4]]
    assert table.replica_counts(5) == (1, 3, 1, 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 0}, "version must be >= 1"),
        ({"version": True}, "version must be an integer"),
        ({"num_workers": 4}, "divisible by num_workers"),
        ({"num_workers": 0}, "num_workers must be >= 1"),
        ({"num_logical_experts": 0}, "num_logical_experts must be >= 1"),
        ({"num_logical_experts": 5}, "no replica of experts [4]"),
        ({"num_logical_experts": 7}, "fewer than the 7 experts"),
        ({"layer_ids": (3,)}, "phy2log has 2 layers but layer_ids has 1"),
        ({"layer_ids": (3, 3)}, "layer_ids must be unique"),
        ({"layer_ids": (-1, 3)}, "layer ids must be >= 0"),
        ({"layer_ids": ()}, "at least one MoE layer"),
        ({"phy2log": ((0, 1, 0, 2, 3, 0), (3, 2, 1, 0, 1))}, "layer 5 has 5 slots"),
        ({"phy2log": ((0, 1, 0, 2, 3, 4), (3, 2, 1, 0, 1, 1))}, "slot 5 holds expert 4"),
        ({"phy2log": ((0, 1, 0, 2, 3, -1), (3, 2, 1, 0, 1, 1))}, "holds expert -1"),
        ({"phy2log": ((0, 1, 0, 2, 1, 0), (3, 2, 1, 0, 1, 1))}, "layer 3 has no replica of"),
        ({"phy2log": ((0, 1, 0.5, 2, 3, 0), (3, 2, 1, 0, 1, 1))}, "must be an integer"),
        ({"phy2log": (1, 2)}, "sequence of per-layer sequences"),
    ],
)
def test_validation_names_the_problem(changes, message):
    fields = small_table().to_dict() | changes
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PlacementTable(**fields)


def test_normalises_numpy_and_lists_to_hashable_ints():
    table = PlacementTable(
        np.int64(2), 3, 4, [3, 5], np.array([[0, 1, 0, 2, 3, 0], [3, 2, 1, 0, 1, 1]])
    )
    assert table == small_table(version=2)
    assert hash(table) == hash(small_table(version=2))
    assert all(type(e) is int for row in table.phy2log for e in row)
    assert type(table.version) is int


def test_unknown_layer_and_out_of_range_worker_or_slot():
    table = small_table()
    with pytest.raises(ValueError, match="layer 4 is not a MoE layer"):
        table.replicas(4)
    with pytest.raises(ValueError, match="worker 3 outside"):
        table.slots_of_worker(3)
    with pytest.raises(ValueError, match="slot 6 outside"):
        table.worker_of_slot(6)


def test_dict_round_trip_through_json():
    table = small_table(version=7)
    again = PlacementTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table
    assert again.with_version(8).version == 8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("phy2log"), "lacks keys"),
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.update(phy2log="0123"), "list of lists"),
        (lambda d: d.update(layer_ids=3), "layer_ids must be a list"),
        (lambda d: d.update(version=1.0), "version must be an integer"),
    ],
)
def test_from_dict_rejects_malformed(mutate, message):
    d = small_table().to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        PlacementTable.from_dict(d)
    with pytest.raises(ValueError, match="JSON object"):
        PlacementTable.from_dict([1])


def test_route_spreads_within_the_batch_and_is_deterministic():
    table = small_table()
    topk = np.array([[0, 1], [0, 2], [0, 3], [0, -1]])
    slots = table.route(3, topk)
    # Expert 0 has replicas at slots 0, 2, 5: the four tokens cycle through them.
    assert slots[:, 0].tolist() == [0, 2, 5, 0]
    assert slots[:, 1].tolist() == [1, 3, 4, -1]
    assert np.array_equal(table.route(3, topk), slots)
    # The offset rotates the starting replica.
    assert table.route(3, topk, offset=1)[:, 0].tolist() == [2, 5, 0, 2]


def test_route_rejects_bad_input():
    table = small_table()
    with pytest.raises(ValueError, match="outside 0..3"):
        table.route(3, np.array([[4]]))
    with pytest.raises(ValueError, match="2-D"):
        table.route(3, np.array([0, 1]))
    with pytest.raises(ValueError, match="integer array"):
        table.route(3, np.array([[0.0]]))


@st.composite
def tables_and_batches(draw):
    workers = draw(st.integers(1, 6))
    spw = draw(st.integers(1, 5))
    slots = workers * spw
    experts = draw(st.integers(1, slots))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        extra = draw(
            st.lists(
                st.integers(0, experts - 1), min_size=slots - experts, max_size=slots - experts
            )
        )
        row = list(range(experts)) + extra
        rows.append(draw(st.permutations(row)))
    table = PlacementTable(1, workers, experts, tuple(range(len(rows))), tuple(rows))
    tokens = draw(st.integers(0, 40))
    k = draw(st.integers(1, 4))
    topk = draw(
        st.lists(
            st.lists(st.integers(-1, experts - 1), min_size=k, max_size=k),
            min_size=tokens,
            max_size=tokens,
        )
    )
    return table, np.array(topk, dtype=np.int64).reshape(tokens, k), draw(st.integers(0, 10))


@settings(max_examples=200, deadline=None)
@given(tables_and_batches())
def test_route_maps_to_replicas_evenly(case):
    table, topk, offset = case
    layer = table.layer_ids[-1]
    slots = table.route(layer, topk, offset=offset)
    assert slots.shape == topk.shape
    assert np.array_equal(slots, table.route(layer, topk.copy(), offset=offset))
    row = table.phy2log[-1]
    replicas = table.replicas(layer)
    for expert in range(table.num_logical_experts):
        chosen = slots[topk == expert]
        assert all(row[s] == expert for s in chosen)  # every slot holds the routed expert
        per_replica = [int(np.sum(chosen == s)) for s in replicas[expert]]
        assert max(per_replica) - min(per_replica) <= 1  # spread evenly over replicas
    assert np.all(slots[topk == -1] == -1)


def test_validates_a_deepseek_sized_table_quickly():
    rows = tuple(tuple(list(range(256)) + list(range(32))) for _ in range(58))
    table = PlacementTable(1, 144, 256, tuple(range(3, 61)), rows)
    assert table.slots_per_worker == 2
    assert table.route(60, np.arange(16).reshape(2, 8)).shape == (2, 8)
