"""SamplingParams <-> epserve.v1.SamplingParams."""

from __future__ import annotations

from services.engine.sampling import SamplingParams
from services.protos_gen.epserve.v1 import inference_pb2


def params_from_proto(p: inference_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError with a message for invalid values."""
    return SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature,
        top_p=p.top_p if p.HasField("top_p") else 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos)


def params_to_proto(s: SamplingParams) -> inference_pb2.SamplingParams:
    p = inference_pb2.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature,
                                     top_p=s.top_p, top_k=s.top_k,
                                     stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos)
    if s.seed is not None:
        p.seed = s.seed
    return p
