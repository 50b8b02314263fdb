"""The balancing benchmarks run, and the planner keeps its edge on a slice of their loads."""

import numpy as np

from bench import bench_eplb, bench_request_lb
from services.balance.eplb import EplbConfig, plan


def test_planner_matches_or_beats_the_greedy_reference_on_deepseek_shaped_loads():
    loads, perturbed = bench_eplb.make_loads()
    loads = loads[:6]
    for unit in (bench_eplb.PREFILL, bench_eplb.DECODE):
        config = EplbConfig(unit.slots, unit.gpus, unit.nodes, unit.groups)
        ours = bench_eplb.evaluate(plan(loads, config).phy2log_array(), loads, unit.gpus)
        greedy = bench_eplb.evaluate(bench_eplb.greedy_reference(loads, unit), loads, unit.gpus)
        naive, _ = bench_eplb.naive_no_redundancy(loads, unit)
        assert ours >= greedy - 1e-12
        assert ours > naive
    assert perturbed.shape == (58, 256) and not np.array_equal(perturbed[:6], loads)


def test_greedy_reference_reproduces_deepseeks_published_figures():
    loads, _ = bench_eplb.make_loads()
    prefill = bench_eplb.evaluate(bench_eplb.greedy_reference(loads, bench_eplb.PREFILL), loads, 32)
    decode = bench_eplb.evaluate(bench_eplb.greedy_reference(loads, bench_eplb.DECODE), loads, 144)
    assert round(prefill, 3) == 0.926
    assert round(decode, 3) == 0.755


def test_benchmarks_print_their_tables(capsys):
    assert bench_eplb.main(["--layers", "2"]) == 0
    assert "planner, hierarchical" in capsys.readouterr().out
    assert bench_request_lb.main(["--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert "round-robin" in out and "balancer, ledger + acks" in out
