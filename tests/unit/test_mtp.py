"""The MTP layer (services/model/mtp.py): loading, its draft cache, and speculative decoding in
the reference engine, whose output must equal plain decoding's (greedy and seeded)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import CheckpointError
from services.engine.compare import assert_same_greedy
from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
from services.engine.sampling import SamplingParams
from services.model.batch import AttentionBatch
from services.model.checkpoint_gen import make_model
from services.model.loader import load_model

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def mtp_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny_mtp"), seed=0, mtp=True)


@pytest.fixture(scope="module")
def model(mtp_dir):
    return load_model(mtp_dir, mtp=True)


def requests(max_tokens=24, **kw):
    return [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                         **kw)) for i, p in enumerate(PROMPTS)]


def test_the_mtp_layer_loads_from_layer_n(mtp_dir, model):
    n = model.cfg.num_hidden_layers
    tensors = load_file(str(mtp_dir / "model.safetensors"))
    assert torch.equal(model.mtp.eh_proj.weight, tensors[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(model.mtp.mlp.experts.gate_up[1][: model.cfg.moe_intermediate_size],
                       tensors[f"model.layers.{n}.mlp.experts.1.gate_proj.weight"])
    plain = load_model(mtp_dir)  # the MTP layer is ignored unless asked for
    assert plain.mtp is None


def test_mtp_needs_a_checkpoint_with_one(tiny_model_dir):
    with pytest.raises(CheckpointError, match="no multi-token-prediction layer"):
        load_model(tiny_model_dir, mtp=True)


def test_without_copies_the_mtp_layer_shares_embedding_and_head(mtp_dir, tmp_path):
    n = load_model(mtp_dir).cfg.num_hidden_layers
    tensors = load_file(str(mtp_dir / "model.safetensors"))
    del tensors[f"model.layers.{n}.embed_tokens.weight"]
    del tensors[f"model.layers.{n}.shared_head.head.weight"]
    for f in mtp_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    m = load_model(tmp_path, mtp=True)
    assert torch.equal(m.mtp.shared_head.head.weight, m.lm_head.weight)
    assert torch.equal(m.mtp.embed_tokens.weight, m.model.embed_tokens.weight)
    tensors[f"model.layers.{n}.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="surprise"):
        load_model(tmp_path, mtp=True)


def test_two_token_decode_queries_equal_the_expanded_path(model):
    """A speculative batch (absorbed attention, one query per new token) computes what the
    expanded path with its causal mask computes."""
    attn = model.layers[0].self_attn
    cache = torch.randn(64, model.cfg.latent_dim)
    batch = AttentionBatch(positions=torch.tensor([5, 6, 3]), query_lens=(2, 1),
                           context_slots=(torch.arange(10, 17), torch.arange(30, 34)),
                           write_slots=torch.tensor([15, 16, 33]), speculative=True)
    h = model.cfg.num_attention_heads
    q_nope = torch.randn(3, h, model.cfg.qk_nope_head_dim)
    q_pe = torch.randn(3, h, model.cfg.qk_rope_head_dim)
    absorbed = attn.attend(q_nope, q_pe, batch, cache)
    attn.mode = "expanded"
    try:
        expanded = attn.attend(q_nope, q_pe, batch, cache)
    finally:
        attn.mode = "auto"
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-4)


def test_mtp_greedy_and_seeded_output_equals_plain_decoding(model):
    plain = ReferenceEngine(model, block_size=8, record_logits=True).generate(requests())
    eng = ReferenceEngine(model, block_size=8, record_logits=True, drafter=mtp_drafter(model))
    spec = eng.generate(requests())
    assert_same_greedy([c.token_ids for c in plain], [c.token_ids for c in spec],
                       [c.logits for c in plain], [c.logits for c in spec])
    assert eng.stats.drafts.proposed[0] > 0
    seeded = dict(temperature=1.0, top_p=0.9, seed=11)
    a = ReferenceEngine(model, block_size=8).generate(requests(**seeded))
    b = ReferenceEngine(model, block_size=8, drafter=mtp_drafter(model)).generate(
        requests(**seeded))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


class Oracle:
    """Drafts the token plain decoding gives (known from a plain run), wrong every 4th call:
    the accepting path runs on most steps, the rejecting one on the rest."""

    def __init__(self, outputs: dict[str, list[int]]) -> None:
        self.outputs, self.calls = outputs, 0

    def propose(self, inputs):
        out = []
        for i in inputs:
            self.calls += 1
            seq = i.seq
            nxt = self.outputs[seq.request_id][len(seq.output_ids)]
            out.append(nxt if self.calls % 4 else (nxt + 1) % seq.params.max_tokens)
        return out

    def forget(self, seq_id):
        pass


def test_accepted_drafts_give_plain_decodings_output(model):
    reqs = requests(max_tokens=30)
    plain = ReferenceEngine(model, block_size=8, record_logits=True).generate(reqs)
    outputs = {c.request_id: c.token_ids + [0] for c in plain}
    eng = ReferenceEngine(model, block_size=8, record_logits=True,
                          drafter=lambda cache: Oracle(outputs))
    spec = eng.generate(reqs)
    assert_same_greedy([c.token_ids for c in plain], [c.token_ids for c in spec],
                       [c.logits for c in plain], [c.logits for c in spec])
    stats = eng.stats.drafts
    assert 0.6 < stats.acceptance() < 0.9 and stats.tokens_per_step > 1.5
    assert eng.stats.decode_steps < sum(len(c.token_ids) for c in plain) // len(plain)


def test_the_draft_cache_equals_running_the_mtp_layer_at_once(model):
    """Drafts made step by step (the MTP layer run over the prompt at prefill, then over what
    each decode step settled, its KV cached per position) equal the MTP layer run over all
    those positions in one batch."""
    from services.engine.kv_cache import LatentKVCache, SeqChunk

    prompt = PROMPTS[0]
    eng = ReferenceEngine(model, block_size=8, drafter=mtp_drafter(model))
    loop = eng.loop([GenerationRequest("r", prompt, SamplingParams(max_tokens=12,
                                                                   ignore_eos=True))])
    made: list[tuple[int, int, int]] = []  # (first position, positions, draft) per call
    original = loop.speculation.drafter.propose

    def recording(inputs):
        drafts = original(inputs)
        made.append((inputs[0].first, len(inputs[0].tokens), drafts[0]))
        return drafts

    loop.speculation.drafter.propose = recording
    while (step := loop.next_step()) is not None:
        args = (step.input_ids, step.batch, loop.cache.layers)
        loop.consume(step, model(*args) if loop.outputs == "last" else
                     model.forward_tokens(*args, all_logits=loop.outputs == "tokens"))
    assert made[0][:2] == (0, len(prompt)), "prefill ran the MTP layer over the whole prompt"
    tokens = prompt + loop.seqs[0].output_ids
    end = made[-1][0] + made[-1][1]
    # one pass: the main model over every token, then the MTP layer over positions 0 .. end-1
    cfg = model.cfg
    cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, 8, 8, draft_layers=1)
    batch = cache.batch([SeqChunk("r", 0, len(tokens))])
    _, hidden = model.forward_tokens(torch.tensor(tokens), batch, cache.layers)
    mtp_batch = cache.batch([SeqChunk("r", 0, end)])
    logits = model.mtp.draft_logits(torch.tensor(tokens[1:end + 1]), hidden[:end], mtp_batch,
                                    cache.draft_layers[0], model.rotary,
                                    model.cos_sin(mtp_batch.positions))
    at_once = logits.argmax(-1).tolist()
    assert len(made) > 3
    for first, n, draft in made:  # each call's draft: the prediction at its last position
        assert at_once[first + n - 1] == draft, (first, n)


def test_seeded_speculative_sampling_follows_the_target_distribution(model):
    """Randomised probability-integral transform of every sampled token against softmax(logits)
    of its step: uniform on [0, 1] if the tokens follow the target distribution; a
    Kolmogorov-Smirnov test at alpha = 0.001 (critical value 1.95 / sqrt(n))."""
    reqs = [GenerationRequest(f"s{i}", PROMPTS[i % 3], SamplingParams(
        max_tokens=6, ignore_eos=True, temperature=1.0, seed=i)) for i in range(120)]
    plain = ReferenceEngine(model, block_size=8).generate(reqs)
    outputs = {c.request_id: c.token_ids + [0] for c in plain}
    eng = ReferenceEngine(model, block_size=8, record_logits=True,
                          drafter=lambda cache: Oracle(outputs))
    spec = eng.generate(reqs)
    assert eng.stats.drafts.accepted[0] > 100  # the accepting path sampled many of them
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    g = torch.Generator().manual_seed(0)
    u = []
    for c in spec:
        for token, row in zip(c.token_ids[1:], c.logits[1:], strict=True):  # decode steps
            p = torch.softmax(row.double(), -1)
            below = float(p[:token].sum())
            u.append(below + float(torch.rand((), generator=g, dtype=torch.float64)) *
                     float(p[token]))
    u.sort()
    n = len(u)
    ks = max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(u))
    assert ks < 1.95 / math.sqrt(n), f"KS statistic {ks:.4f} over {n} samples"
