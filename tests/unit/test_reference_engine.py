import pytest
import torch

from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.loader import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def _req(i, prompt, **kw):
    return GenerationRequest(f"r{i}", prompt, SamplingParams(**kw))


def test_batched_equals_one_at_a_time(tiny):
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    batched = ReferenceEngine(tiny, block_size=8, record_logits=True).generate(
        [_req(i, p, max_tokens=20, ignore_eos=True) for i, p in enumerate(prompts)])
    alone = [ReferenceEngine(tiny, record_logits=True).generate([_req(0, p, max_tokens=20, ignore_eos=True)])[0]
             for p in prompts]
    assert_same_greedy([c.token_ids for c in alone], [c.token_ids for c in batched],
                       [c.logits for c in alone], [c.logits for c in batched])


def test_stop_token_and_max_tokens(tiny):
    free = ReferenceEngine(tiny).generate([_req(0, [3, 4, 5], max_tokens=12, ignore_eos=True)])[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    stopped = ReferenceEngine(tiny).generate(
        [_req(0, [3, 4, 5], max_tokens=12, stop_token_ids=(stop,), ignore_eos=True)])[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def test_seeded_sampling_reproducible(tiny):
    def run(seed):
        return ReferenceEngine(tiny).generate(
            [_req(0, [3, 4, 5], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)])[0].token_ids
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_context_limit_finishes_with_length(tiny):
    n = tiny.cfg.max_position_embeddings - 2
    prompt = torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    out = ReferenceEngine(tiny).generate([_req(0, prompt, max_tokens=50, ignore_eos=True)])[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


def test_bad_requests_rejected(tiny):
    eng = ReferenceEngine(tiny)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([_req(0, [])])
    with pytest.raises(ValueError, match="outside vocab"):
        eng.generate([_req(0, [tiny.cfg.vocab_size])])


def test_stop_strings_end_at_the_token_that_completes_them(tiny, tiny_model_dir):
    from services.model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_model_dir)
    engine = ReferenceEngine(tiny, tokenizer=tok)
    free = engine.generate([_req(0, [3, 4, 5], max_tokens=24, ignore_eos=True)])[0]
    assert free.text == tok.decode(free.token_ids)
    # a stop string taken from the middle of the free text
    cut = next(i for i in range(1, len(free.token_ids))
               if tok.decode(free.token_ids[:i]).strip())
    before = tok.decode(free.token_ids[:cut])
    stop = tok.decode(free.token_ids[:cut + 1])[len(before):]
    assert stop, "the token after the first text adds text of its own"
    stopped = engine.generate([_req(0, [3, 4, 5], max_tokens=24, ignore_eos=True,
                                    stop=(stop,))])[0]
    first = free.text.find(stop)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:first]
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]
    assert tok.decode(stopped.token_ids).find(stop) >= 0  # the last token completed it
    assert tok.decode(stopped.token_ids[:-1]).find(stop) < 0


def test_stop_strings_without_a_tokenizer_are_refused(tiny):
    with pytest.raises(ValueError, match="tokenizer"):
        ReferenceEngine(tiny).generate([_req(0, [3, 4], max_tokens=4, stop=("x",))])


def test_logprobs_match_the_recorded_logits(tiny):
    c = ReferenceEngine(tiny, record_logits=True).generate(
        [_req(0, [3, 4, 5], max_tokens=6, ignore_eos=True, logprobs=3)])[0]
    assert [lp.token_id for lp in c.logprobs] == c.token_ids
    for lp, logits in zip(c.logprobs, c.logits, strict=True):
        expect = torch.log_softmax(logits, -1)
        assert lp.logprob == pytest.approx(float(expect[lp.token_id]))
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the likeliest
        assert len(lp.top) == 3
