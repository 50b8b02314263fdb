"""One request's path through the cluster, as one or more attempts (attempt.py).

The client sees one contiguous stream: token indices 0, 1, 2, ... across attempts, checked
(no gap, no duplicate), detokenised incrementally (UTF-8 safe) and relayed as they come.

Migration: when an attempt's decode instance breaks its stream, ends it early or goes silent,
the request moves (Dynamo's design, made exact): the next attempt sends prompt + every token
already streamed, the remaining max_tokens and the same sampling parameters with the sampling
step offset by the tokens streamed, so greedy and seeded outputs are what an uninterrupted run
gives. At most `migration_limit` moves per request; a request whose last token was already
streamed (a stop token, max_tokens, the context) finishes here without a new attempt.

Stop strings are matched here, on the detokenised text (engine/stop_strings.py, the matcher
the reference engine uses): text that may begin one is held back, and when one matches the
request ends at that token with finish_reason "stop" (the decode call is closed).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import structlog

from services.engine.sampling_proto import params_to_proto
from services.engine.stop_strings import StopStrings
from services.model.detokenizer import IncrementalDetokenizer
from services.model.tokenizer import Tokenizer
from services.protos_gen.epserve.v1 import inference_pb2
from services.router import metrics
from services.router.attempt import Attempt, AttemptPlan, Migrate, Parts, RequestFailed
from services.router.sequence import SequenceError, TokenSequenceChecker
from services.router.validation import ValidRequest

__all__ = ["Outcome", "RequestFailed", "RequestFlow"]
log = structlog.get_logger("router")


@dataclass
class Outcome:
    """What the usage record and the final message report."""

    finish_reason: str = "abort"
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_instance: str = ""
    decode_instance: str = ""
    prompt_cache_hit_tokens: int = 0  # of the client's prompt (the first prefill's figure)
    migrations: int = 0
    started_at: float = field(default_factory=time.time)


class RequestFlow:
    def __init__(self, parts: Parts, tokenizer: Tokenizer, timeout_s: float,
                 migration_limit: int, eos_token_id: int | None, context_tokens: int) -> None:
        self.parts, self.tokenizer, self.timeout_s = parts, tokenizer, timeout_s
        self.migration_limit = migration_limit
        self.eos_token_id, self.context_tokens = eos_token_id, context_tokens

    async def run(self, req: ValidRequest, outcome: Outcome
                  ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        stream = _Stream(req, self.tokenizer, self.parts.clock())
        if req.resume_ids:  # the client resumes on this router: as a migration from its tokens
            outcome.migrations = 1
            outcome.completion_tokens = len(req.resume_ids)
            metrics.MIGRATIONS.labels(reason="resumed").inc()
        deadline = stream.t0 + self.timeout_s
        if req.resume_ids and (stream.stops.stopped or self._already_finished(
                req, stream.streamed) is not None):
            # everything was streamed before the client's router went away: only the end
            yield self._final(stream, outcome, self._already_finished(req, stream.streamed))
            return
        while True:
            attempt = Attempt(self.parts, self._plan(req, stream.streamed, outcome.migrations),
                              deadline, outcome)
            try:
                # aclosing: a client that leaves ends the attempt (and its decode call) now
                async with aclosing(self._relay(attempt, stream, outcome)) as relay:
                    async for response in relay:
                        yield response
                return
            except Migrate as move:
                reason = self._already_finished(req, stream.streamed)
                if reason is not None:  # the last token was out: nothing left to generate
                    yield self._final(stream, outcome, reason)
                    return
                self._migrate(req, outcome, move)

    async def _relay(self, attempt: Attempt, stream: _Stream, outcome: Outcome
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """One attempt's events as the client's responses (indices continue the stream)."""
        rid, clock = stream.req.request_id, self.parts.clock
        base = len(stream.streamed)
        async with aclosing(attempt.events()) as events:
            async for event in events:
                kind = event.WhichOneof("kind")
                try:
                    if kind == "token":
                        stream.checker.accept(base + event.token.seq, event.token.token_id)
                    elif kind == "finished":
                        stream.checker.check_finished(base + event.finished.completion_tokens)
                except SequenceError as exc:
                    raise RequestFailed(grpc.StatusCode.INTERNAL, f"{rid}: {exc}") from exc
                if kind == "finished":
                    yield self._final(stream, outcome, event.finished.finish_reason)
                    return
                now = clock()
                if stream.last_token_at is None:
                    outcome.ttft_s = now - stream.t0
                    metrics.TTFT.observe(outcome.ttft_s)
                else:
                    metrics.TPOT.observe(now - stream.last_token_at)
                stream.last_token_at = now
                stream.streamed.append(event.token.token_id)
                outcome.completion_tokens = stream.checker.received
                metrics.COMPLETION_TOKENS.inc()
                delta = inference_pb2.TokenDelta(
                    index=base + event.token.seq, token_ids=[event.token.token_id],
                    text=stream.stops.push(stream.detok.push(event.token.token_id)))
                if event.token.HasField("logprobs"):
                    delta.logprobs.append(event.token.logprobs)
                yield inference_pb2.GenerateResponse(delta=delta)
                if stream.stops.stopped:  # a stop string: the request ends at this token
                    yield self._final(stream, outcome, "stop")
                    return

    def _plan(self, req: ValidRequest, streamed: list[int], migrations: int) -> AttemptPlan:
        sampling = params_to_proto(req.sampling)
        sampling.max_tokens = req.sampling.max_tokens - len(streamed)
        # A migrated attempt gets its own internal id: the old instance may still hold the
        # request (a stalled one), and "#" is not allowed in client ids, so none collides.
        rid = req.request_id if not migrations else f"{req.request_id}#m{migrations}"
        if req.resume_ids:  # another router may have used the #m ids of this request
            rid = f"{req.request_id}#r{len(req.resume_ids)}m{migrations}"
        return AttemptPlan(rid, list(req.prompt_ids) + streamed, sampling, len(streamed),
                           req.tenant)

    def _migrate(self, req: ValidRequest, outcome: Outcome, move: Migrate) -> None:
        rid = req.request_id
        if outcome.migrations >= self.migration_limit:
            raise RequestFailed(move.code, f"{rid}: {move.message}; migration limit "
                                           f"{self.migration_limit} reached")
        outcome.migrations += 1
        metrics.MIGRATIONS.labels(reason=move.reason).inc()
        if move.decode_at_fault:
            self.parts.view.suspect(move.instance_id, self.parts.clock())
        log.warning("request_migrated", reason=move.reason, decode=move.instance_id,
                    error=move.message, tokens_streamed=outcome.completion_tokens,
                    migration=outcome.migrations)

    def _already_finished(self, req: ValidRequest, streamed: list[int]) -> str | None:
        s = req.sampling
        if streamed and (streamed[-1] in s.stop_token_ids
                         or (streamed[-1] == self.eos_token_id and not s.ignore_eos)):
            return "stop"
        if len(streamed) >= s.max_tokens or len(req.prompt_ids) + len(streamed) \
                >= self.context_tokens:
            return "length"
        return None

    def _final(self, stream: _Stream, outcome: Outcome, reason: str | None
               ) -> inference_pb2.GenerateResponse:
        req = stream.req
        text = stream.stops.push(stream.detok.flush())
        text += stream.stops.flush()
        if stream.stops.stopped:  # the held-back end of the text held a stop string
            reason = "stop"
        outcome.finish_reason = reason
        return inference_pb2.GenerateResponse(final=inference_pb2.GenerateFinal(
            request_id=req.request_id, finish_reason=reason, text=text,
            usage=inference_pb2.Usage(
                prompt_tokens=len(req.prompt_ids), completion_tokens=stream.checker.received,
                time_to_first_token_s=outcome.ttft_s,
                total_time_s=self.parts.clock() - stream.t0,
                prompt_cache_hit_tokens=outcome.prompt_cache_hit_tokens,
                prompt_cache_miss_tokens=len(req.prompt_ids) - outcome.prompt_cache_hit_tokens)))


class _Stream:
    """What the client has been sent, across attempts."""

    def __init__(self, req: ValidRequest, tokenizer: Tokenizer, t0: float) -> None:
        self.req, self.t0 = req, t0
        self.checker = TokenSequenceChecker(req.sampling.max_tokens)
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids)
        self.stops = StopStrings(req.sampling.stop)
        self.streamed: list[int] = list(req.resume_ids)
        self.checker.received = len(self.streamed)  # the client has these already
        for token in self.streamed:  # their text too: deltas continue after it
            self.stops.push(self.detok.push(token))
        self.last_token_at: float | None = None
