"""ReadPlanner: read from disk while that is faster than recomputing."""

from __future__ import annotations

import pytest

from services.prefix_cache.planner import ReadPlanner


def test_reads_while_unmeasured():
    planner = ReadPlanner()
    assert planner.worth_reading(10**12, 1)
    planner.observe_read(1_000, 1.0)
    assert planner.worth_reading(10**12, 1)  # prefill speed still unknown
    planner = ReadPlanner()
    planner.observe_prefill(1_000, 1.0)
    assert planner.worth_reading(10**12, 1)


def test_compares_read_time_with_recompute_time():
    planner = ReadPlanner()
    planner.observe_read(1_000_000, 1.0)  # 1 MB/s
    planner.observe_prefill(1_000, 1.0)  # 1000 tokens/s
    assert planner.read_bytes_per_s == 1e6 and planner.prefill_tokens_per_s == 1e3
    assert planner.worth_reading(500_000, 1_000)  # 0.5 s vs 1 s
    assert not planner.worth_reading(2_000_000, 1_000)  # 2 s vs 1 s


def test_margin_favours_recompute():
    planner = ReadPlanner(margin=3.0)
    planner.observe_read(1_000_000, 1.0)
    planner.observe_prefill(1_000, 1.0)
    assert not planner.worth_reading(500_000, 1_000)  # 0.5 s * 3 > 1 s


def test_exponential_weighting_follows_a_slower_disk():
    planner = ReadPlanner(alpha=0.5)
    planner.observe_read(1_000_000, 0.001)  # 1 GB/s
    planner.observe_prefill(1_000, 1.0)
    assert planner.worth_reading(100_000_000, 1_000)  # 0.1 s vs 1 s
    for _ in range(20):
        planner.observe_read(1_000_000, 1.0)  # the disk got loaded: 1 MB/s
    assert planner.read_bytes_per_s == pytest.approx(1e6, rel=1e-3)
    assert not planner.worth_reading(100_000_000, 1_000)


def test_large_reads_weigh_more_than_small_ones():
    planner = ReadPlanner(alpha=0.5)
    planner.observe_read(10_000_000, 0.01)  # 1 GB/s
    planner.observe_read(1_000, 0.001)  # a tiny read dominated by latency: 1 MB/s
    assert planner.read_bytes_per_s > 400e6


def test_ignores_empty_measurements_and_clamps_zero_time():
    planner = ReadPlanner()
    planner.observe_read(0, 1.0)
    planner.observe_read(100, -1.0)
    assert planner.read_bytes_per_s is None
    planner.observe_read(100, 0.0)
    assert planner.read_bytes_per_s == pytest.approx(1e8)


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"alpha": 1.5}, {"margin": 0}])
def test_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        ReadPlanner(**kwargs)
