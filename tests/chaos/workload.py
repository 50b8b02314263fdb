"""A scenario's requests, their reference completions, and the two kinds of client.

Requests: distinct prompts (random token ids, so a token that leaks from one stream into
another is detectable), half greedy, half seeded sampling with an explicit seed (temperature,
top-p, top-k vary), one in three with presence / frequency penalties, a few without
ignore_eos; one in four goes through the real `openai`
package to a router's OpenAI-compatible HTTP API, the rest through services/client.py's
InferenceClient over gRPC with both routers (a request whose router fails with UNAVAILABLE is
sent again to the next router, or resumed there mid-stream). The OpenAI side gets what the
protocol allows: a request that failed before its first chunk with a connection error or a 503
is sent to the other router; one cut mid-stream cannot be resumed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import openai
import torch

from services.client import InferenceClient
from services.engine.reference import GenerationRequest, ReferenceEngine
from services.engine.sampling import SamplingParams
from services.model.detokenizer import IncrementalDetokenizer
from tests.chaos.history import Expected, History

MIN_TOKEN_ID = 5  # below: BOS/EOS/pad and friends of the generated tokenizers
REQUEST_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Planned:
    request_id: str
    api: str  # grpc | openai
    prompt_ids: list[int]
    params: SamplingParams
    burst: bool = False  # one of the requests sent together when the fault's moment comes


def _params(i: int, seed_base: int) -> SamplingParams:
    max_tokens = (6, 9, 12, 5, 8, 10)[i % 6]
    ignore_eos = i % 10 != 9
    # One request in three carries presence / frequency penalties, which count the tokens
    # generated before a migration too (negative ones: the random models rarely repeat).
    penalties = {"presence_penalty": -1.0, "frequency_penalty": -0.5} if i % 3 == 1 else {}
    if i % 2 == 0:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **penalties)
    k = (i // 2) % 3
    return SamplingParams(max_tokens=max_tokens, temperature=(0.7, 0.9, 1.2)[k],
                          top_p=(1.0, 0.9, 0.95)[k], top_k=(0, 20, 0)[k],
                          seed=seed_base + i, ignore_eos=ignore_eos, **penalties)


def plan(scenario: int, n: int, burst: int, vocab: int, burst_prompt_tokens: int = 0
         ) -> list[Planned]:
    """n requests with distinct prompts; the last `burst` are the burst (prompts of
    `burst_prompt_tokens` tokens when given: a longer KV transfer)."""
    g = torch.Generator().manual_seed(10_000 + scenario)
    seen: set[tuple[int, ...]] = set()
    out = []
    for i in range(n):
        is_burst = i >= n - burst
        length = burst_prompt_tokens if is_burst and burst_prompt_tokens else 4 + (i * 7) % 21
        while True:
            prompt = tuple(torch.randint(MIN_TOKEN_ID, vocab, (length,), generator=g).tolist())
            if prompt not in seen:
                seen.add(prompt)
                break
        api = "openai" if i % 4 == 3 else "grpc"
        out.append(Planned(f"chaos-s{scenario:02d}-r{i:03d}", api, list(prompt),
                           _params(i, 1_000 * (scenario + 1)), is_burst))
    return out


def completion_text(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """The text the router streams for `ids` after `prompt_ids` (services/model/detokenizer.py:
    a prompt that ends inside a UTF-8 character changes the first characters)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return "".join(detok.push(t) for t in ids) + detok.flush()


def reference(model, tokenizer, reqs: list[Planned]) -> dict[str, Expected]:
    """The reference engine's completions, on one torch thread: ~10x faster than two threads
    on this machine's two cores, which the cluster's processes also want."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        comps = ReferenceEngine(model, record_logits=True).generate(
            [GenerationRequest(r.request_id, r.prompt_ids, r.params) for r in reqs])
    finally:
        torch.set_num_threads(threads)
    return {c.request_id: Expected(c.token_ids, c.logits, c.finish_reason,
                                   completion_text(tokenizer, c.prompt_ids, c.token_ids))
            for c in comps}


class RecordingClient(InferenceClient):
    """InferenceClient whose every response stream is recorded into the request's History
    (its retry on the next router included: each try is an `attempt` event)."""

    def __init__(self, endpoint: str, histories: dict[str, History]) -> None:
        super().__init__(endpoint)
        self.histories = histories

    def stream(self, request, timeout=None, router: int = 0):
        call = super().stream(request, timeout, router)
        return self._recorded(call, self.histories[request.request_id],
                              router % len(self.stubs))

    async def _recorded(self, call, h: History, router: int):
        h.attempt(time.monotonic(), router)
        try:
            async for resp in call:
                t = time.monotonic()
                if resp.WhichOneof("kind") == "delta":
                    d = resp.delta
                    for k, token_id in enumerate(d.token_ids):
                        h.token(t, d.index + k, token_id, d.text if k == 0 else "")
                else:
                    f = resp.final
                    h.final(t, f.finish_reason, f.usage.prompt_tokens, f.usage.completion_tokens,
                            f.text, f.request_id)
                yield resp
        finally:
            call.cancel()  # no-op once the stream ended; frees it when the caller gave up


async def run_grpc(client: RecordingClient, r: Planned, h: History) -> None:
    try:
        await client.generate(r.request_id, prompt_ids=r.prompt_ids, params=r.params,
                              timeout=REQUEST_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        h.error(time.monotonic(), exc.code().name, exc.details() or "")
    except Exception as exc:  # the client itself broke: still one terminal event
        h.error(time.monotonic(), f"client:{type(exc).__name__}", str(exc))


def openai_clients(urls: list[str]) -> list[openai.AsyncOpenAI]:
    return [openai.AsyncOpenAI(base_url=f"{u}/v1", api_key="chaos", max_retries=0,
                               timeout=REQUEST_TIMEOUT_S) for u in urls]


def _body(r: Planned) -> tuple[dict, dict]:
    p = r.params
    args = {"max_tokens": p.max_tokens, "temperature": p.temperature,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty}
    if not p.greedy:
        args |= {"top_p": p.top_p, "seed": p.seed}
    return args, {"top_k": p.top_k, "ignore_eos": p.ignore_eos}


async def run_openai(clients: list[openai.AsyncOpenAI], first: int, model: str, r: Planned,
                     h: History) -> None:
    args, extra = _body(r)
    code, message = "", ""
    for tried in range(len(clients)):
        k = (first + tried) % len(clients)
        h.attempt(time.monotonic(), k)
        streamed, last = 0, None  # last: the chunk with the finish reason (the final's text)
        try:
            stream = await clients[k].completions.create(
                model=model, prompt=r.prompt_ids, stream=True, extra_body=extra,
                stream_options={"include_usage": True},
                extra_headers={"X-Request-Id": r.request_id}, **args)
            async for chunk in stream:
                t = time.monotonic()
                choice = chunk.choices[0] if chunk.choices else None
                if chunk.usage is not None:  # OpenAI's usage chunk, after the last choice
                    h.final(t, last.finish_reason if last else "", chunk.usage.prompt_tokens,
                            chunk.usage.completion_tokens, last.text if last else "",
                            chunk.id)
                elif choice is not None and choice.finish_reason is not None:
                    last = choice
                elif choice is not None:
                    h.token(t, streamed, None, choice.text)
                    streamed += 1
            if not h.terminals:
                h.error(time.monotonic(), "openai:no_final", "stream ended without usage")
            return
        except openai.APIStatusError as exc:
            code, message = f"http_{exc.status_code}", str(exc)
            retry = exc.status_code == 503
        except openai.APIConnectionError as exc:  # APITimeoutError included
            code, message = f"openai:{type(exc).__name__}", str(exc)
            retry = True
        except openai.APIError as exc:  # an error event in the stream
            body = exc.body if isinstance(exc.body, dict) else {}
            code, message = f"stream:{body.get('code', 'error')}", str(exc)
            retry = False
        except Exception as exc:
            code, message, retry = f"client:{type(exc).__name__}", str(exc), False
        if streamed or not retry:
            break
    h.error(time.monotonic(), code, message)
