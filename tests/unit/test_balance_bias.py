"""DeepSeek-V3's auxiliary-loss-free bias rule: b_i += gamma * sign(mean_load - load_i)."""

from __future__ import annotations

import pytest
import torch

from services.train.balance_bias import balancedness, update_bias


def test_overloaded_experts_lose_gamma_underloaded_gain_it_mean_stays():
    bias = torch.tensor([0.0, 0.5, -0.25, 1.0])
    load = torch.tensor([10, 2, 6, 6])  # mean 6
    new = update_bias(bias, load, gamma=0.1)
    assert torch.allclose(new, torch.tensor([-0.1, 0.6, -0.25, 1.0]))
    assert torch.equal(bias, torch.tensor([0.0, 0.5, -0.25, 1.0]))  # a new tensor


def test_even_load_changes_nothing_and_dtype_is_kept():
    bias = torch.zeros(8, dtype=torch.float32)
    new = update_bias(bias, torch.full((8,), 3), gamma=1.0)
    assert torch.equal(new, bias) and new.dtype == torch.float32


def test_repeated_updates_steer_the_choice_toward_balance():
    # A gate that always prefers expert 0 by a margin: the bias closes the margin, and from
    # then on the choice rotates over every expert.
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5])
    bias = torch.zeros(4)
    chosen_late = torch.zeros(4)
    for step in range(400):
        chosen = int(torch.argmax(scores + bias))
        load = torch.zeros(4).index_fill_(0, torch.tensor(chosen), 1.0)
        bias = update_bias(bias, load, gamma=0.01)
        if step >= 200:
            chosen_late[chosen] += 1
    assert (chosen_late > 0).all(), chosen_late
    assert float(bias[0]) < float(bias[1:].min())  # expert 0's head start is paid back


def test_shape_mismatch_and_negative_gamma_are_refused():
    with pytest.raises(ValueError, match="shape"):
        update_bias(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="gamma"):
        update_bias(torch.zeros(4), torch.zeros(4), gamma=-1)


def test_balancedness_is_mean_over_max():
    assert balancedness(torch.tensor([1, 1, 1, 1])) == 1.0
    assert balancedness(torch.tensor([4, 0, 0, 0])) == 0.25
    assert balancedness(torch.zeros(3)) == 1.0
