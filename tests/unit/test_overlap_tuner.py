"""The overlap tuner (pure): warm-up takes turns, then the faster way wins, with one
exploration step in `explore_every`; estimates are per phase and size bucket, and per plan."""

from __future__ import annotations

import pytest

from services.engine.overlap_tuner import OverlapTuner, size_bucket


def drive(tuner: OverlapTuner, phase: str, tokens: int, cost: dict[int, float], steps: int):
    """Run `steps` steps whose seconds per token are cost[micro_batches]; the choices made."""
    ways = []
    for _ in range(steps):
        way = tuner.choose(phase, tokens)
        tuner.record(phase, tokens, way, cost[way] * tokens)
        ways.append(way)
    return ways


def test_size_buckets_are_powers_of_two():
    assert [size_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 0, 1, 1, 2, 2, 3, 9]


@pytest.mark.parametrize("faster", [1, 2])
def test_warm_up_takes_turns_then_the_faster_way_wins(faster):
    tuner = OverlapTuner(warmup=3, explore_every=10, window=4)
    cost = {faster: 1.0, 3 - faster: 2.0}
    ways = drive(tuner, "decode", 8, cost, 40)
    assert ways[:6] == [2, 1, 2, 1, 2, 1]  # three samples of each, two first
    assert tuner.preferred("decode", 8) == faster
    after = ways[6:]
    explored = [i + 7 for i, w in enumerate(after) if w != faster]  # 1-based step numbers
    assert explored == [10, 20, 30, 40]  # every explore_every-th step of the bucket


def test_a_change_in_the_wire_is_noticed_through_exploration():
    tuner = OverlapTuner(warmup=2, explore_every=4, window=3)
    drive(tuner, "decode", 16, {1: 1.0, 2: 2.0}, 12)
    assert tuner.preferred("decode", 16) == 1
    ways = drive(tuner, "decode", 16, {1: 1.0, 2: 0.2}, 12)  # the link got slow: overlap wins
    assert ways[-4:] == [2, 2, 2, 1]  # explorations moved the median; step 24 explores 1
    assert tuner.preferred("decode", 16) == 2


def test_one_outlier_step_does_not_flip_the_choice():
    tuner = OverlapTuner(warmup=3, explore_every=1000, window=5)
    drive(tuner, "decode", 8, {1: 1.0, 2: 1.5}, 10)
    tuner.record("decode", 8, 1, 50.0 * 8)  # one step slowed by something else
    assert tuner.preferred("decode", 8) == 1


def test_estimates_are_per_phase_and_bucket_and_a_new_plan_forgets_them():
    tuner = OverlapTuner(warmup=1, explore_every=100)
    tuner.reset_for(1)
    drive(tuner, "decode", 8, {1: 1.0, 2: 2.0}, 4)
    drive(tuner, "prefill", 8, {1: 2.0, 2: 1.0}, 4)
    drive(tuner, "decode", 300, {1: 2.0, 2: 1.0}, 4)
    assert tuner.preferred("decode", 15) == 1  # same bucket as 8
    assert tuner.preferred("prefill", 8) == 2
    assert tuner.preferred("decode", 256) == 2
    assert tuner.preferred("decode", 4) is None  # never seen
    tuner.reset_for(1)
    assert tuner.preferred("decode", 8) == 1  # the same plan keeps what it learned
    tuner.reset_for(2)
    assert tuner.preferred("decode", 8) is None


def test_a_tie_prefers_one_micro_batch_and_bad_records_are_ignored():
    tuner = OverlapTuner(warmup=1)
    drive(tuner, "decode", 4, {1: 1.0, 2: 1.0}, 2)
    assert tuner.preferred("decode", 4) == 1
    for way, tokens, seconds in ((3, 4, 1.0), (2, 0, 1.0), (2, 4, float("nan")), (2, 4, -1.0)):
        tuner.record("decode", tokens, way, seconds)
    assert tuner.preferred("decode", 4) == 1


def test_settings_are_checked():
    for kw in ({"warmup": 0}, {"explore_every": 1}, {"warmup": 9, "window": 8}):
        with pytest.raises(ValueError):
            OverlapTuner(**kw)
