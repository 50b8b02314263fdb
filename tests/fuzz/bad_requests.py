"""Hypothesis strategies for requests that are bad by construction, one family per API.

Each strategy starts from a valid request and applies one to three mutations, every one of
which makes the request invalid on its own (a wrong type, a value out of range, a structure the
API does not take), so any combination is a request the service must refuse cleanly; the other
fields vary freely within what is valid. The vocabulary and context sizes are the model's.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from services.protos_gen.epserve.v1 import expert_pb2, inference_pb2, serving_pb2, tensor_pb2
from services.router.openai_params import MAX_GENERATIONS


@dataclass(frozen=True)
class Model:
    vocab: int
    context: int
    hidden: int
    top_k: int
    moe_layer: int  # one MoE layer id
    dense_layer: int  # a layer with no experts


BIG = 2**63  # one past every 64-bit signed id
text = st.text(max_size=40)
anything = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=False), text, st.lists(st.integers(), max_size=3),
                     st.dictionaries(text, st.integers(), max_size=2))
not_a_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                         st.lists(st.integers(), max_size=2), st.dictionaries(text, text))
not_a_number = st.one_of(text, st.booleans(), st.lists(st.integers(), max_size=2))
not_an_int = st.one_of(text, st.booleans(), st.floats(allow_nan=False).filter(
    lambda x: not x.is_integer()))


# ---- HTTP: /v1/completions and /v1/chat/completions ---------------------------------------------

def _valid_body(chat: bool, m: Model) -> st.SearchStrategy[dict]:
    prompt = (st.fixed_dictionaries({"messages": st.just([{"role": "user",
                                                              "content": "hello"}])})
              if chat else st.fixed_dictionaries({"prompt": st.one_of(
                  st.text(min_size=1, max_size=30).filter(str.strip),
                  st.lists(st.integers(5, m.vocab - 1), min_size=1, max_size=8))}))
    optional = st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2),
        "top_p": st.floats(0.1, 1), "seed": st.integers(0, 2**31), "top_k": st.integers(0, 50),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
        "stop": st.lists(st.text(min_size=1, max_size=5), max_size=3),
        "ignore_eos": st.booleans()})
    return st.tuples(prompt, optional).map(lambda t: {**t[0], **t[1]})


def _http_mutations(chat: bool, m: Model) -> st.SearchStrategy[tuple[str, object]]:
    """(key, bad value); the key "" means: drop the prompt / messages."""
    common = [
        ("max_tokens", st.one_of(st.integers(max_value=0), st.integers(m.context, 10**9),
                                 not_an_int)),
        ("temperature", st.one_of(st.floats(max_value=-1e-3, allow_nan=False), not_a_number)),
        ("top_p", st.one_of(st.floats(max_value=0, allow_nan=False),
                            st.floats(min_value=1.001, allow_nan=False), not_a_number)),
        ("top_k", st.one_of(st.integers(max_value=-1), not_an_int)),
        ("seed", st.one_of(st.integers(max_value=-1), st.integers(BIG, 2 * BIG), not_an_int)),
        ("n", st.one_of(st.integers(max_value=0), st.integers(17, 10**6), not_an_int)),
        ("stop", st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=3),
                           st.just([""]), st.lists(st.just("x"), min_size=17, max_size=20),
                           st.text(min_size=257, max_size=300))),
        ("logit_bias", st.one_of(
            st.lists(st.integers(), max_size=2),
            st.dictionaries(st.text(alphabet="abc-", min_size=1, max_size=4), st.integers(),
                            min_size=1, max_size=2),
            st.dictionaries(st.integers(0, m.vocab - 1).map(str),
                            st.one_of(st.floats(100.01, 1e9), st.floats(-1e9, -100.01), text),
                            min_size=1, max_size=2),
            st.dictionaries(st.integers(m.vocab, 10**9).map(str), st.floats(-5, 5),
                            min_size=1, max_size=2))),
        ("presence_penalty", st.one_of(st.floats(2.01, 1e9), st.floats(-1e9, -2.01),
                                       not_a_number)),
        ("frequency_penalty", st.one_of(st.floats(2.01, 1e9), not_a_number)),
        ("stream", st.one_of(text, st.integers(), st.lists(st.booleans(), max_size=2))),
        ("model", st.one_of(not_a_string, st.text(min_size=1, max_size=20).map(
            lambda s: f"no-such-model-{s}"))),
        ("stop_token_ids", st.one_of(st.lists(st.integers(max_value=-1), min_size=1, max_size=2),
                                     st.lists(st.integers(m.vocab, 10**9), min_size=1,
                                              max_size=2),
                                     st.lists(text, min_size=1, max_size=2))),
        ("ignore_eos", st.one_of(text, st.integers(2, 5))),
        ("tools", st.lists(st.dictionaries(text, text), min_size=1, max_size=2)),
        ("frobnicate-" + "x", anything.filter(lambda v: v is not None)),
        ("", st.none()),  # no prompt at all
    ]
    if chat:
        specific = [
            ("messages", st.one_of(not_a_string.filter(lambda v: not isinstance(v, list)),
                                   st.just([]),
                                   st.lists(st.fixed_dictionaries(
                                       {"role": st.sampled_from(["wizard", "", "USER"]),
                                        "content": text}), min_size=1, max_size=2),
                                   st.lists(st.fixed_dictionaries(
                                       {"role": st.just("user"), "content": not_a_string}),
                                       min_size=1, max_size=2),
                                   st.lists(st.fixed_dictionaries(
                                       {"role": st.just("user"), "content": text,
                                        "name": text}), min_size=1, max_size=2))),
            ("logprobs", st.one_of(text, st.integers(1, 5))),
            ("top_logprobs", st.one_of(st.integers(21, 10**6), st.integers(max_value=-1))),
            ("response_format", st.just({"type": "json_object"})),
            ("echo", st.just(True)),
        ]
    else:
        specific = [
            ("prompt", st.one_of(st.integers(), st.dictionaries(text, text, min_size=1),
                                 st.lists(st.integers(m.vocab, 10**9), min_size=1, max_size=3),
                                 st.just(""), st.just([]), _bad_batch(m))),
            ("logprobs", st.one_of(st.integers(21, 10**6), st.integers(max_value=-1),
                                   st.just(True), text)),
            ("echo", st.just(True)),
            ("best_of", st.integers(2, 10)),
            ("suffix", st.text(min_size=1, max_size=5)),
            ("top_logprobs", st.integers(0, 5)),  # a chat parameter
        ]
    return st.one_of(*[st.tuples(st.just(k), v) for k, v in common + specific])


def _bad_batch(m: Model) -> st.SearchStrategy[list]:
    """A batch of prompts (completions) that is bad whole: an empty prompt in it, two forms
    mixed, every prompt's tokens outside the vocabulary, or more prompts than a request may."""
    word = st.text(min_size=1, max_size=8)
    ids = st.lists(st.integers(5, m.vocab - 1), min_size=1, max_size=3)
    return st.one_of(
        st.lists(word, max_size=2).map(lambda batch: [*batch, ""]),
        st.lists(ids, max_size=2).map(lambda batch: [*batch, []]),
        st.tuples(word, ids).map(list), st.tuples(ids, st.integers(5, m.vocab - 1)).map(list),
        st.lists(st.lists(st.integers(m.vocab, 10**9), min_size=1, max_size=2), min_size=2,
                 max_size=3),
        st.lists(st.lists(text, min_size=1, max_size=2), min_size=1, max_size=2),
        st.integers(MAX_GENERATIONS + 1, MAX_GENERATIONS + 9).map(lambda n: ["x"] * n))


def _mutate(body: dict, mutations: list[tuple[str, object]], chat: bool) -> dict:
    body = dict(body)
    for key, value in mutations:
        if key == "":
            body.pop("messages" if chat else "prompt", None)
        elif key == "top_logprobs" and chat:
            body["logprobs"], body[key] = True, value  # out of range even with logprobs on
        else:
            body[key] = value
    return body


@st.composite
def bad_http_body(draw, chat: bool, m: Model) -> bytes:
    """The raw body of a bad request: a bad JSON object (mostly), or not JSON / not an object."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=40).filter(_not_json))
    if kind == 1:
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(),
                                         text, st.none()))).encode()
    body = _mutate(draw(_valid_body(chat, m)),
                   draw(st.lists(_http_mutations(chat, m), min_size=1, max_size=3)), chat)
    return json.dumps(body).encode()


def _not_json(data: bytes) -> bool:
    try:
        return not isinstance(json.loads(data), dict)
    except (ValueError, UnicodeDecodeError):
        return True


# ---- gRPC: Inference.Generate -----------------------------------------------------------------

def _sampling_mutations(m: Model) -> list:
    """Mutations of a SamplingParams message, each invalid alone (as (field, value) setters)."""
    def setter(name):
        return lambda v: (name, v)
    return [
        st.just(0).map(setter("max_tokens")),
        st.integers(m.context, 2**32 - 1).map(setter("max_tokens")),
        st.one_of(st.floats(max_value=-1e-3, allow_nan=False), st.just(math.nan),
                  st.just(math.inf)).map(setter("temperature")),
        st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(1.001, 1e9),
                  st.just(math.nan)).map(setter("top_p")),
        st.integers(BIG, 2**64 - 1).map(setter("seed")),
        st.lists(st.integers(m.vocab, 2**32 - 1), min_size=1, max_size=2).map(
            setter("stop_token_ids")),
        st.one_of(st.floats(2.01, 1e9), st.floats(-1e9, -2.01), st.just(math.nan)).map(
            setter("presence_penalty")),
        st.one_of(st.floats(2.01, 1e9), st.just(math.inf)).map(setter("frequency_penalty")),
        st.one_of(st.dictionaries(st.integers(m.vocab, 2**32 - 1), st.floats(-5, 5),
                                  min_size=1, max_size=2),
                  st.dictionaries(st.integers(0, m.vocab - 1),
                                  st.one_of(st.floats(100.01, 1e9), st.just(math.nan)),
                                  min_size=1, max_size=2)).map(setter("logit_bias")),
        st.integers(21, 2**32 - 1).map(setter("logprobs")),
        st.one_of(st.just([""]), st.lists(st.just("ab"), min_size=17, max_size=18),
                  st.text(min_size=257, max_size=260).map(lambda s: [s])).map(setter("stop")),
    ]


def _apply_sampling(p: inference_pb2.SamplingParams, field: str, value) -> None:
    if field in ("stop_token_ids", "stop"):
        getattr(p, field).extend(value)
    elif field == "logit_bias":
        p.logit_bias.update(value)
    else:
        setattr(p, field, value)


@st.composite
def valid_sampling(draw, m: Model) -> inference_pb2.SamplingParams:
    p = inference_pb2.SamplingParams(max_tokens=draw(st.integers(1, 4)),
                                     temperature=draw(st.sampled_from([0.0, 0.7])),
                                     ignore_eos=draw(st.booleans()))
    p.seed = draw(st.integers(0, 2**31))
    if draw(st.booleans()):
        p.top_p = draw(st.floats(0.1, 1.0))
    return p


@st.composite
def bad_generate_request(draw, m: Model) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(
        request_id=f"fuzz-{draw(st.integers(0, 10**12))}",
        prompt_ids=draw(st.lists(st.integers(5, m.vocab - 1), min_size=1, max_size=8)))
    req.sampling.CopyFrom(draw(valid_sampling(m)))
    request_level = [
        st.text(min_size=1, max_size=20).map(lambda s: ("request_id", f"bad id {s}")),
        st.just(("request_id", "x" * 129)),
        st.text(min_size=1, max_size=10).map(lambda s: ("model", f"no-such-{s}")),
        st.just(("no_prompt", None)),
        st.text(min_size=1, max_size=10).map(lambda s: ("prompt", s)),  # a second form
        st.lists(st.integers(m.vocab, 2**32 - 1), min_size=1, max_size=3).map(
            lambda ids: ("prompt_ids", ids)),
        st.just(("messages", [("wizard", "hi")])),
        st.lists(st.integers(5, m.vocab - 1), min_size=5, max_size=8).map(
            lambda ids: ("resume_token_ids", ids)),  # more than max_tokens (<= 4)
    ]
    sampling = [s.map(lambda fv: ("sampling", fv)) for s in _sampling_mutations(m)]
    for field, value in draw(st.lists(st.one_of(*request_level, *sampling), min_size=1,
                                      max_size=3)):
        if field == "sampling":
            _apply_sampling(req.sampling, *value)
        elif field == "no_prompt":
            del req.prompt_ids[:]
            req.ClearField("messages")
            req.prompt = ""
        elif field == "prompt":
            req.prompt = value
            if not req.prompt_ids:
                req.prompt_ids.append(5)
        elif field == "prompt_ids":
            req.prompt_ids.extend(value)
        elif field == "messages":
            req.messages.add(role=value[0][0], content=value[0][1])
        elif field == "resume_token_ids":
            req.resume_token_ids.extend(value)
            req.sampling.max_tokens = min(req.sampling.max_tokens or 1, 4)
        else:
            setattr(req, field, value)
    return req


# ---- internal RPCs --------------------------------------------------------------------------------

@st.composite
def bad_decode_request(draw, m: Model) -> serving_pb2.DecodeRequest:
    """Decode.Generate: a valid one would reserve KV and wait for its transfer; these never."""
    req = serving_pb2.DecodeRequest(
        request_id=f"fuzz-d-{draw(st.integers(0, 10**12))}",
        prompt_ids=draw(st.lists(st.integers(5, m.vocab - 1), min_size=1, max_size=8)))
    req.sampling.CopyFrom(draw(valid_sampling(m)))
    structural = [
        st.just(("no_prompt", None)),
        st.lists(st.integers(m.vocab, 2**32 - 1), min_size=1, max_size=2).map(
            lambda ids: ("prompt_ids", ids)),
        st.integers(9, 2**32 - 1).map(lambda n: ("step_offset", n)),  # past the prompt
        st.just(("long_prompt", None)),
        st.just(("unseeded", None)),
    ]
    sampling = [s.map(lambda fv: ("sampling", fv)) for s in _sampling_mutations(m)]
    for field, value in draw(st.lists(st.one_of(*structural, *sampling), min_size=1,
                                      max_size=3)):
        if field == "sampling":
            _apply_sampling(req.sampling, *value)
        elif field == "no_prompt":
            del req.prompt_ids[:]
        elif field == "prompt_ids":
            req.prompt_ids.extend(value)
        elif field == "step_offset":
            req.step_offset = max(value, len(req.prompt_ids) + 1)
        elif field == "long_prompt":
            req.prompt_ids.extend([5] * m.context)
        elif field == "unseeded":
            req.sampling.temperature = 0.5
            req.sampling.ClearField("seed")
    return req


@st.composite
def bad_prefill_request(draw, m: Model, decode_endpoint: str) -> serving_pb2.PrefillRequest:
    d = draw(bad_decode_request(m))
    req = serving_pb2.PrefillRequest(request_id=d.request_id.replace("-d-", "-p-"),
                                     prompt_ids=d.prompt_ids, step_offset=d.step_offset,
                                     decode_endpoint=decode_endpoint)
    req.sampling.CopyFrom(d.sampling)
    if draw(st.integers(0, 9)) == 0:
        req.decode_endpoint = ""  # also invalid alone
    return req


@st.composite
def bad_kv_transfer(draw, m: Model) -> list[serving_pb2.KVChunk]:
    """Decode.TransferKV streams that must not install anything."""
    rid = f"fuzz-kv-{draw(st.integers(0, 10**12))}"
    n = draw(st.integers(0, 4))
    chunks = [serving_pb2.KVChunk(request_id=rid, index=i, data=draw(st.binary(max_size=64)),
                                  last=i == n - 1) for i in range(n)]
    if chunks:
        first = chunks[0]
        first.dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 99]))
        first.shape.extend(draw(st.lists(st.integers(-5, 64), max_size=4)))
        first.first_token = draw(st.integers(0, 2**32 - 1))
        first.total_bytes = draw(st.integers(0, 2**20))
        chunks[-1].sha256 = draw(st.binary(min_size=0, max_size=32))
        how = draw(st.integers(0, 4))
        if how == 1 and n > 1:
            chunks[1].index = draw(st.integers(2, 9))  # out of order
        elif how == 2:
            chunks.append(serving_pb2.KVChunk(request_id=rid, index=n, data=b"x"))  # after last
        elif how == 3 and n > 1:
            chunks[1].request_id = rid + "-other"
    return chunks  # unknown request id, random header and bytes: never a valid transfer


def _tensor(draw, shape, dtype) -> tensor_pb2.Tensor:
    size = {tensor_pb2.DTYPE_FP32: 4, tensor_pb2.DTYPE_BF16: 2, tensor_pb2.DTYPE_INT32: 4,
            tensor_pb2.DTYPE_INT64: 8, tensor_pb2.DTYPE_FP8_E4M3: 1}.get(dtype, 1)
    count = math.prod(shape) if shape else 0
    data = bytes(draw(st.binary(min_size=count * size, max_size=count * size))) \
        if count * size <= 4096 else b"\0" * (count * size)
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def bad_dispatch(draw, m: Model, placement_version: int) -> expert_pb2.DispatchRequest:
    """ExpertWorker.DispatchOnce requests a worker must reject (it computes nothing)."""
    n = draw(st.integers(1, 4))
    hidden_shape, slots_shape, weights_shape = [n, m.hidden], [n, m.top_k], [n, m.top_k]
    hidden_dtype, slots_dtype = tensor_pb2.DTYPE_FP32, tensor_pb2.DTYPE_INT32
    layer, version, combine = m.moe_layer, placement_version, tensor_pb2.DTYPE_FP32
    slots_values = None
    how = draw(st.integers(0, 8))
    if how == 0:
        layer = m.dense_layer
    elif how == 1:
        version = placement_version + draw(st.integers(1, 1000))
    elif how == 2:
        hidden_shape = [n, m.hidden + draw(st.integers(1, 8))]
    elif how == 3:
        slots_shape = [n, m.top_k + 1]
    elif how == 4:
        hidden_dtype = draw(st.sampled_from([tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64, 0]))
    elif how == 5:
        slots_dtype = tensor_pb2.DTYPE_FP32
    elif how == 6:
        combine = draw(st.sampled_from([tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_FP8_E4M3, 42]))
    elif how == 7:
        slots_values = draw(st.integers(-100, -2))  # below -1: not a slot
    else:
        hidden_shape = [n]  # not 2-D
    req = expert_pb2.DispatchRequest(step_id=draw(st.integers(0, 10**9)), layer_id=layer,
                                     placement_version=version, combine_dtype=combine,
                                     trace_tag="fuzz")
    req.hidden.CopyFrom(_tensor(draw, hidden_shape, hidden_dtype))
    slots = [-1] * math.prod(slots_shape)
    if slots_values is not None:
        slots[0] = slots_values
    req.slots.CopyFrom(tensor_pb2.Tensor(dtype=slots_dtype, shape=slots_shape,
                                         data=struct.pack(f"<{len(slots)}i", *slots)))
    req.weights.CopyFrom(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FP32, shape=weights_shape,
                                           data=b"\0" * 4 * math.prod(weights_shape)))
    return req
