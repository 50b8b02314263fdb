"""SamplingParams and TokenLogprobs <-> their epserve.v1 messages."""

from __future__ import annotations

from services.engine.sampling import SamplingParams, TokenLogprobs
from services.protos_gen.epserve.v1 import inference_pb2


def params_from_proto(p: inference_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError with a message for invalid values."""
    return SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())),
        logprobs=p.logprobs if p.HasField("logprobs") else None, stop=tuple(p.stop))


def params_to_proto(s: SamplingParams) -> inference_pb2.SamplingParams:
    p = inference_pb2.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                                     top_p=s.top_p, top_k=s.top_k,
                                     stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
                                     presence_penalty=s.presence_penalty,
                                     frequency_penalty=s.frequency_penalty,
                                     logit_bias=dict(s.logit_bias), stop=list(s.stop))
    if s.seed is not None:
        p.seed = s.seed
    if s.logprobs is not None:
        p.logprobs = s.logprobs
    return p


def logprobs_to_proto(lp: TokenLogprobs) -> inference_pb2.TokenLogprobs:
    return inference_pb2.TokenLogprobs(logprob=lp.logprob, top=[
        inference_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprobs_from_proto(token_id: int, p: inference_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(token_id, p.logprob, tuple((t.token_id, t.logprob) for t in p.top))
