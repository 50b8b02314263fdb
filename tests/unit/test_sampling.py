import pytest
import torch

from services.engine.sampling import SamplingParams, filter_logits, sample_token


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, SamplingParams(), step=0) == 1


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
])
def test_invalid_params_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_seeded_sampling_is_a_function_of_seed_and_step():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample_token(logits, p, step) for step in range(20)]
    b = [sample_token(logits, p, step) for step in range(20)]
    assert a == b
    other = [sample_token(logits, SamplingParams(temperature=1.0, seed=8), s) for s in range(20)]
    assert a != other


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    best = int(torch.argmax(logits))
    for step in range(10):
        assert sample_token(logits, SamplingParams(temperature=2.0, top_k=1, seed=3), step) == best
        assert sample_token(logits, SamplingParams(temperature=2.0, top_p=1e-6, seed=3), step) == best


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert torch.isfinite(kept).tolist() == [True, True, False, False]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0, seed=11)
    counts = torch.zeros(3)
    for step in range(3000):
        counts[sample_token(probs.log(), p, step)] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_with_seed_fixes_a_seed_once():
    p = SamplingParams(temperature=1.0).with_seed()
    assert p.seed is not None and p.with_seed() == p
    assert SamplingParams().with_seed().seed is None  # greedy needs none
