"""`epserve generate`: run the reference engine (or, later, a remote cluster) from the shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from services.balance.naive import contiguous_placement
from services.common.errors import CheckpointError, CliError, ConfigError
from services.engine.ep_client import EPError, ExpertClient
from services.engine.ep_engine import EPEngine
from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
from services.engine.sampling import SamplingParams
from services.local.expert_workers import LocalExpertWorkers
from services.model.config import ModelConfig
from services.model.deepseek import no_experts


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop-token-ids", default="", help="comma-separated ids that end generation")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=[],
                   help="a stop string (repeat for more): the text ends before it")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--logit-bias", default="",
                   help="comma-separated ID:BIAS pairs added to those tokens' logits")
    p.add_argument("--logprobs", type=int, default=None,
                   help="with --json: each token's logprob and this many alternatives'")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text: locally (reference or EP engine) or through a cluster")
    p.add_argument("--model", default="", help="checkpoint directory (local generation)")
    p.add_argument("--api-key", default=os.environ.get("EPSERVE_API_KEY", ""),
                   help="API key for a router started with --api-keys ($EPSERVE_API_KEY)")
    p.add_argument("--endpoint", default="",
                   help="HOST:PORT of a running router (epserve up): generate through the cluster")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--expert-workers", type=int, default=0,
                   help="run routed experts on N expert-worker processes started here")
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="extra expert slots (copies of experts) across the workers")
    p.add_argument("--expert-endpoints", default="",
                   help="use running expert workers: host:port,... in rank order")
    p.add_argument("--wire", default="fp32", choices=["fp32", "bf16", "fp8"],
                   help="dispatch/combine format: fp32, bf16, or fp8 dispatch + bf16 combine")
    p.add_argument("--speculative", choices=["off", "mtp"], default="off",
                   help="local generation: speculative decoding with the checkpoint's MTP layer "
                        "(the output is unchanged; the draft acceptance goes to stderr)")
    p.add_argument("--request-id", action="append", default=[],
                   help="with --endpoint: the request id of each prompt, in order (--prompt-ids "
                        "first, then --prompt); default: cli-<random>-<n>, unique per run")
    add_sampling_args(p)
    p.set_defaults(func=_run)


def _ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise CliError(f"{what} must be comma-separated integers, got {text!r}") from exc


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
            stop_token_ids=tuple(_ids(args.stop_token_ids, "--stop-token-ids")),
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
            logit_bias=_logit_bias(args.logit_bias), logprobs=args.logprobs,
            stop=tuple(args.stop),
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _logit_bias(text: str) -> tuple[tuple[int, float], ...]:
    try:
        pairs = [(int(k), float(v)) for k, v in (p.split(":") for p in text.split(",")
                                                  if p.strip())]
    except ValueError as exc:
        raise CliError(f"--logit-bias must be comma-separated ID:BIAS pairs, got {text!r}"
                       ) from exc
    return tuple(sorted(dict(pairs).items()))


def prompt_ids(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    prompts = [_ids(p, "--prompt-ids") for p in args.prompt_ids]
    for text in args.prompt:
        if tokenizer is None:
            raise CliError("--prompt needs a tokenizer.json in the model directory; use --prompt-ids")
        if args.chat:
            prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        else:
            prompts.append(tokenizer.encode(text))
    if not prompts:
        raise CliError("give --prompt TEXT or --prompt-ids 1,2,3")
    if any(not p for p in prompts):
        raise CliError("empty prompt")
    return prompts


def load_tokenizer(model_dir: str):
    from services.model.tokenizer import Tokenizer

    if not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_dir(model_dir)


def print_completions(args, tokenizer, completions) -> None:
    for c in completions:
        text = c.text if c.text is not None else (
            tokenizer.decode(c.token_ids, skip_special_tokens=True) if tokenizer else "")
        if args.json:
            row = {"request_id": c.request_id, "prompt_ids": c.prompt_ids,
                   "token_ids": c.token_ids, "text": text, "finish_reason": c.finish_reason,
                   "prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.token_ids)}
            if c.logprobs:
                row["logprobs"] = _logprobs_json(c.logprobs)
            print(json.dumps(row))
        else:
            print(text if tokenizer else " ".join(map(str, c.token_ids)))


async def _generate_ep(args: argparse.Namespace, model, requests, tokenizer=None):
    """Routed experts on worker processes: started here (and stopped by pid) or given."""
    workers = None
    try:
        if args.expert_workers:
            try:
                table = contiguous_placement(model.cfg.n_routed_experts, args.expert_workers,
                                             model.cfg.moe_layer_ids, redundant=args.redundant_experts)
            except ValueError as exc:
                raise CliError(str(exc)) from exc
            workers = LocalExpertWorkers(args.model, table)
            endpoints = await asyncio.to_thread(workers.start)
        else:
            endpoints = [e.strip() for e in args.expert_endpoints.split(",") if e.strip()]
        client = await ExpertClient.connect(endpoints, wire=args.wire)
        try:
            engine = EPEngine(model, client)
            return await engine.generate(requests, tokenizer, _drafter(args, model)), engine.stats
        finally:
            await client.close()
    finally:
        if workers is not None:
            workers.stop()


async def _generate_remote(args: argparse.Namespace, params: SamplingParams) -> list[dict]:
    """Every prompt sent concurrently to the router; text prompts are tokenised there."""
    import grpc

    from services.client import InferenceClient, unique_prefix

    prompts = [{"prompt_ids": _ids(p, "--prompt-ids")} for p in args.prompt_ids]
    prompts += [{"messages": [("user", t)]} if args.chat else {"prompt": t} for t in args.prompt]
    if not prompts:
        raise CliError("give --prompt TEXT or --prompt-ids 1,2,3")
    ids = request_ids(args.request_id, len(prompts), unique_prefix("cli"))
    async with InferenceClient(args.endpoint, api_key=args.api_key) as client:
        try:
            done = await asyncio.gather(*(client.generate(rid, params=params, **p)
                                          for rid, p in zip(ids, prompts, strict=True)))
        except grpc.aio.AioRpcError as exc:
            raise CliError(f"{exc.code().name}: {exc.details()}") from exc
    return [{"request_id": c.request_id, "token_ids": c.token_ids, "text": c.text,
             "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
             "completion_tokens": len(c.token_ids), "ttft_s": round(c.ttft_s, 4),
             **({"logprobs": _logprobs_json(c.logprobs)} if c.logprobs else {})}
            for c in done]


def _logprobs_json(logprobs) -> list[dict]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
            for lp in logprobs]


def request_ids(given: list[str], prompts: int, prefix: str) -> list[str]:
    """The ids the user gave (one per prompt), or `<prefix>-<n>`: a run's own prefix, so two
    runs at once never send one id twice (the router refuses a duplicate: ALREADY_EXISTS)."""
    if not given:
        return [f"{prefix}-{i}" for i in range(prompts)]
    if len(given) != prompts or len(set(given)) != len(given):
        raise CliError(f"give one distinct --request-id per prompt ({prompts}), got "
                       f"{len(given)}: {', '.join(given)}")
    return list(given)


def _drafter(args: argparse.Namespace, model):
    return mtp_drafter(model) if args.speculative == "mtp" else None


def _run(args: argparse.Namespace) -> int:
    from services.model.loader import load_model

    params = sampling_params(args)
    if args.endpoint:
        if args.expert_workers or args.expert_endpoints:
            raise CliError("--endpoint sends to a cluster; it takes no --expert-* flags")
        if args.speculative != "off":
            raise CliError("--speculative is the cluster's choice (epserve up --speculative)")
        for row in asyncio.run(_generate_remote(args, params)):
            print(json.dumps(row) if args.json else row["text"])
        return 0
    if not args.model:
        raise CliError("give --model DIR (local) or --endpoint HOST:PORT (a running cluster)")
    if args.request_id:
        raise CliError("--request-id names requests sent to a cluster: it needs --endpoint")

    if not Path(args.model).is_dir():
        raise CliError(f"model directory {args.model!r} does not exist")
    remote = bool(args.expert_workers or args.expert_endpoints)
    if args.expert_workers < 0 or (args.expert_workers and args.expert_endpoints):
        raise CliError("give either --expert-workers N (N > 0) or --expert-endpoints")
    try:
        tokenizer = load_tokenizer(args.model)
        cfg = ModelConfig.from_dir(args.model)
        model = load_model(args.model, experts=no_experts(cfg) if remote else None, dtype=args.dtype,
                           mtp=args.speculative == "mtp")
    except (ConfigError, CheckpointError, ValueError, OSError) as exc:
        raise CliError(str(exc)) from exc
    requests = [GenerationRequest(f"req-{i}", ids, params)
                for i, ids in enumerate(prompt_ids(args, tokenizer))]
    try:
        if args.expert_workers or args.expert_endpoints:
            completions, stats = asyncio.run(_generate_ep(args, model, requests, tokenizer))
        else:
            engine = ReferenceEngine(model, tokenizer=tokenizer, drafter=_drafter(args, model))
            completions, stats = engine.generate(requests), engine.stats
    except (ValueError, EPError) as exc:
        raise CliError(str(exc)) from exc
    print_completions(args, tokenizer, completions)
    if stats.drafts is not None:  # on stderr: stdout keeps one line per prompt
        print(f"speculative {args.speculative}: draft acceptance "
              f"{stats.drafts.acceptance():.3f}, {stats.drafts.tokens_per_step:.2f} tokens "
              "per sequence per decode step", file=sys.stderr)
    sys.stdout.flush()
    return 0
