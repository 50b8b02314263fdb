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


# ---- logit_bias, presence / frequency penalties, logprobs -------------------------------------

from services.engine.sampling import adjust_logits, choose, token_logprobs  # noqa: E402
from services.engine.sequence import Sequence  # noqa: E402


def test_penalties_are_openais_definitions():
    logits = torch.zeros(6)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust_logits(logits, p, generated=[2, 2, 2, 4])
    assert out.tolist() == [0, 0, -(0.5 + 3 * 0.25), 0, -(0.5 + 0.25), 0]
    assert torch.equal(adjust_logits(logits, p, ()), logits)  # nothing generated yet


def test_logit_bias_adds_to_the_named_tokens_and_steers_greedy():
    logits = torch.tensor([1.0, 3.0, 2.0])
    p = SamplingParams(logit_bias=((0, 5.0), (1, -100.0)))
    assert adjust_logits(logits, p).tolist() == [6.0, -97.0, 2.0]
    assert sample_token(logits, p, step=0) == 0


def test_a_negative_presence_penalty_makes_greedy_repeat():
    logits = torch.tensor([1.0, 1.5, 0.0])
    assert sample_token(logits, SamplingParams(presence_penalty=-1.0), 0, generated=[0]) == 0
    assert sample_token(logits, SamplingParams(), 0, generated=[0]) == 1


@pytest.mark.parametrize("kwargs", [
    dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
    dict(logit_bias=((3, 101.0),)), dict(logit_bias=((2, 1.0), (1, 1.0))),
    dict(logit_bias=((1, 1.0), (1, 2.0))), dict(logprobs=21), dict(logprobs=-1),
    dict(stop=("",)), dict(stop=("x" * 257,)), dict(stop=tuple("abcdefghijklmnopq")),
])
def test_invalid_new_params_rejected_naming_the_field(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_logprobs_are_the_models_log_softmax_with_the_likeliest_first():
    logits = torch.tensor([0.0, 2.0, 2.0, -1.0])
    lp = token_logprobs(logits, 3, top=3)
    expect = torch.log_softmax(logits, -1)
    assert lp.token_id == 3 and lp.logprob == pytest.approx(float(expect[3]))
    assert [t for t, _ in lp.top] == [1, 2, 0]  # a tie: the lowest id first
    assert token_logprobs(logits, 1, top=0).top == ()


def test_choose_returns_logprobs_only_when_asked():
    logits = torch.tensor([0.0, 1.0])
    assert choose(logits, SamplingParams(), 0) == (1, None)
    token, lp = choose(logits, SamplingParams(logprobs=1), 0)
    assert token == 1 and lp.top[0][0] == 1


def test_a_migrated_sequence_counts_the_tokens_generated_before_it():
    """prompt [5, 6] + 2 tokens streamed before the move (7, 7): the penalty sees 7 twice."""
    p = SamplingParams(max_tokens=5, frequency_penalty=1.0)
    seq = Sequence("r", [5, 6, 7, 7], p, None, 100, step_offset=2)
    assert seq.generated_ids == [7, 7]
    seq.append(3)
    assert seq.generated_ids == [7, 7, 3]
    logits = torch.zeros(8)
    logits[7] = 1.5  # the likeliest, until penalised by 2 x 1.0
    assert seq.sample(logits)[0] == 0
    fresh = Sequence("r", [5, 6, 7, 7], p, None, 100)  # the same prompt, nothing generated
    assert fresh.sample(logits)[0] == 7
