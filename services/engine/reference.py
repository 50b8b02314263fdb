"""The single-process reference engine: the definition of "the right answer".

GenerationLoop is the schedule, free of model code: batched prefill of every prompt, then one
batched decode step per token over the paged latent cache until every sequence stops. The
ReferenceEngine drives it with the local model (all routed experts held here); the EP engine
(services/engine/ep_engine.py) drives the same loop with experts on remote workers, so both
compute identical schedules. Per-step logits can be recorded for near-tie analysis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.engine.mtp_drafter import MTPDrafter
from services.engine.sampling import SamplingParams, TokenLogprobs
from services.engine.sequence import Sequence
from services.engine.speculative import DraftInput, DraftStats, Speculation, VerifyPlan
from services.engine.stop_strings import StopText
from services.model.batch import AttentionBatch
from services.model.config import ModelConfig
from services.model.deepseek import DeepseekModel


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    logits: list[torch.Tensor] = field(default_factory=list)  # the logits each token came from
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # when params.logprobs is set
    text: str | None = None  # with a tokenizer: the completion's text (cut at a stop string)


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    drafts: DraftStats | None = None  # with speculative decoding

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def validate_request(cfg: ModelConfig, req: GenerationRequest) -> None:
    if not req.prompt_ids:
        raise ValueError(f"{req.request_id}: empty prompt")
    bad = [t for t in req.prompt_ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"{req.request_id}: token id {bad[0]} outside vocab [0, {cfg.vocab_size})")
    if len(req.prompt_ids) >= cfg.max_position_embeddings:
        raise ValueError(f"{req.request_id}: prompt of {len(req.prompt_ids)} tokens leaves no "
                         f"room in a context of {cfg.max_position_embeddings}")
    named = [*req.params.stop_token_ids, *(t for t, _ in req.params.logit_bias)]
    if any(t >= cfg.vocab_size for t in named):
        raise ValueError(f"{req.request_id}: stop_token_ids and logit_bias must name ids in "
                         f"[0, {cfg.vocab_size})")


def check_internal_request(cfg: ModelConfig, request_id: str, prompt_ids, params: SamplingParams,
                           step_offset: int) -> None:
    """What prefill and decode check of a request the router already validated (anyone else
    who reaches them gets a clear INVALID_ARGUMENT, not a failure deep in the model)."""
    validate_request(cfg, GenerationRequest(request_id, list(prompt_ids), params))
    if len(prompt_ids) + params.max_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                         f"exceeds the model's context of {cfg.max_position_embeddings}")
    if step_offset > len(prompt_ids):
        raise ValueError(f"step_offset {step_offset} is more than the prompt's "
                         f"{len(prompt_ids)} tokens")


@dataclass(frozen=True)
class Step:
    phase: str  # "prefill" | "decode"
    input_ids: torch.Tensor  # [T]
    batch: AttentionBatch


class GenerationLoop:
    def __init__(self, cfg: ModelConfig, requests: list[GenerationRequest], block_size: int,
                 dtype: torch.dtype, device: torch.device | str, record_logits: bool,
                 stats: EngineStats, tokenizer=None, drafter=None) -> None:
        """drafter: a function of the cache that returns a Drafter (speculative decoding:
        services/engine/speculative.py), or None."""
        for r in requests:
            validate_request(cfg, r)
            if r.params.stop and tokenizer is None:
                raise ValueError(f"{r.request_id}: stop strings need the engine's tokenizer")
        self.record_logits, self.stats = record_logits, stats
        self.seqs = [Sequence(r.request_id, list(r.prompt_ids), r.params.with_seed(),
                              cfg.eos_token_id, cfg.max_position_embeddings) for r in requests]
        self.logits: dict[str, list[torch.Tensor]] = {s.request_id: [] for s in self.seqs}
        self.texts = {s.request_id: StopText(tokenizer, s.prompt_ids, s.params.stop)
                      for s in self.seqs} if tokenizer is not None else {}
        blocks = sum(-(-min(len(s.prompt_ids) + s.params.max_tokens, s.max_context) // block_size)
                     for s in self.seqs)
        self.cache = LatentKVCache(cfg.num_hidden_layers, cfg.latent_dim, blocks, block_size,
                                   dtype, device, draft_layers=1 if drafter else 0)
        if drafter is not None and stats.drafts is None:
            stats.drafts = DraftStats()
        self.speculation = Speculation(drafter(self.cache), stats.drafts) if drafter else None
        self._plan: VerifyPlan | None = None
        self._running: list[Sequence] = []
        self._prefilled = False
        self._t0 = 0.0

    def next_step(self) -> Step | None:
        self._t0 = time.perf_counter()
        if not self._prefilled:
            self._running = list(self.seqs)
            chunks = [SeqChunk(s.request_id, 0, len(s.prompt_ids)) for s in self._running]
            ids = [t for s in self._running for t in s.prompt_ids]
            return Step("prefill", torch.tensor(ids, dtype=torch.long), self.cache.batch(chunks))
        self._running = [s for s in self.seqs if not s.finished]
        if not self._running:
            return None
        if self.speculation is not None:
            self._plan = plan = self.speculation.plan(self._running)
            return Step("decode", plan.input_ids, self.cache.batch(plan.chunks, speculative=True))
        chunks = [SeqChunk(s.request_id, s.cache_len, 1) for s in self._running]
        ids = [s.output_ids[-1] for s in self._running]
        return Step("decode", torch.tensor(ids, dtype=torch.long), self.cache.batch(chunks))

    @property
    def outputs(self) -> str:
        """What the step just planned needs of the forward (overlap.OUTPUTS): "last", each
        sequence's last logits; with speculation, "tokens" in decode (every token's logits
        and hidden) and "last+hidden" in prefill (the MTP layer runs over the prompt)."""
        if self.speculation is None:
            return "last"
        return "tokens" if self._plan is not None else "last+hidden"

    def consume(self, step: Step, output) -> None:
        """output: what `outputs` asked for: the logits, or (logits, hidden)."""
        before = sum(len(s.output_ids) for s in self._running)
        if self._plan is not None:
            logits, hidden = output
            plan, self._plan = self._plan, None
            inputs = self.speculation.settle(plan, logits.float().cpu(), hidden, self._append)
            self.speculation.draft(inputs)
        else:
            logits, hidden = output if self.speculation is not None else (output, None)
            for s, row in zip(self._running, logits.float().cpu(), strict=True):
                self._append(s, *s.sample(row), row)
            if hidden is not None:  # the prompt's positions get the draft layer's KV
                self.speculation.draft(prompt_draft_inputs(self._running, hidden))
        seconds = time.perf_counter() - self._t0
        if step.phase == "prefill":
            self._prefilled = True
            self.stats.prefill_tokens += step.input_ids.numel()
            self.stats.prefill_seconds += seconds
        else:
            self.stats.decode_tokens += sum(len(s.output_ids) for s in self._running) - before
            self.stats.decode_seconds += seconds
            self.stats.decode_steps += 1

    def _append(self, s: Sequence, token: int, logprobs, row: torch.Tensor) -> bool:
        if self.record_logits:
            self.logits[s.request_id].append(row.clone())
        s.append(token, logprobs)
        text = self.texts.get(s.request_id)
        if text is not None and text.push(token):
            s.finish_reason = "stop"  # a stop string: the text ends before it
        return True

    def completions(self) -> list[Completion]:
        out = []
        for s in self.seqs:
            text = self.texts.get(s.request_id)
            whole = text.text() if text is not None else None
            reason = "stop" if text is not None and text.stops.stopped else (
                s.finish_reason or "length")
            out.append(Completion(s.request_id, s.prompt_ids, s.output_ids, reason,
                                  self.logits[s.request_id], s.logprobs, whole))
        return out


def prompt_draft_inputs(seqs: list[Sequence], hidden: torch.Tensor) -> list[DraftInput]:
    """After a prefill of whole prompts (hidden [T, H], the prompts end to end): what the
    drafter needs to run over every prompt position, each followed by the next prompt token
    and, at the last one, the token just sampled."""
    out, at = [], 0
    for s in seqs:
        n = len(s.prompt_ids)
        if not s.finished:
            out.append(DraftInput(s, 0, s.prompt_ids[1:] + s.output_ids[:1],
                                  hidden[at:at + n]))
        at += n
    return out


class ReferenceEngine:
    def __init__(self, model: DeepseekModel, block_size: int = 64, record_logits: bool = False,
                 routed_fns=None, tokenizer=None, drafter=None):
        """drafter: speculative decoding's draft, a function of the loop's KV cache returning
        a Drafter (`mtp_drafter` for the model's MTP layer), or None."""
        self.model = model
        self.drafter = drafter
        self.cfg = model.cfg
        self.block_size = block_size
        self.record_logits = record_logits
        self.routed_fns = routed_fns  # layer -> replacement for its local experts
        self.tokenizer = tokenizer  # for completions' text and stop strings (None: ids only)
        self.stats = EngineStats()

    def loop(self, requests: list[GenerationRequest]) -> GenerationLoop:
        return GenerationLoop(self.cfg, requests, self.block_size, self.model.dtype,
                              self.model.device, self.record_logits, self.stats,
                              self.tokenizer, self.drafter)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        loop = self.loop(requests)
        while (step := loop.next_step()) is not None:
            args = (step.input_ids.to(self.model.device), step.batch, loop.cache.layers,
                    self.routed_fns)
            kind = loop.outputs
            loop.consume(step, self.model(*args) if kind == "last" else
                         self.model.forward_tokens(*args, all_logits=kind == "tokens"))
        return loop.completions()


def mtp_drafter(model: DeepseekModel):
    """The drafter argument for the model's MTP layer (the model loaded with mtp=True)."""
    return lambda cache: MTPDrafter(model, cache)
