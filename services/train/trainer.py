"""The training loop: next-token loss through the serving model's own forward, AdamW, and the
auxiliary-loss-free bias update after every step.

The model is services/model/'s DeepseekModel, run with forward_with_grad: a step's windows are
one prefill batch (contiguous_batch, every sequence from position 0) over fresh latent caches,
so training runs exactly the stages serving runs (MLA projections, the cache write and read,
the gate, the ExpertBank's grouped SwiGLU) and autograd differentiates them. The gate's
correction bias is no parameter of the optimiser; balance_bias.update_bias moves it from the
per-expert token counts each ExpertBank keeps.

Resumable: every checkpoint_every_s the whole state (weights, optimiser, step, metrics) goes to
work_dir/state.pt and the HF checkpoint is exported, so stopping at any point leaves a usable
model. Window sampling is seeded per step, so a resumed run draws the windows the uninterrupted
run would have.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as BackendTokenizer
from tqdm import tqdm

from services.model.batch import contiguous_batch
from services.model.config import ModelConfig
from services.model.deepseek import DeepseekModel
from services.train.balance_bias import balancedness, update_bias
from services.train.export import save_checkpoint
from services.train.recipe import TrainConfig
from services.train.windows import TokenStream, eval_windows, sample_windows

log = structlog.get_logger("train")
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"


@dataclass
class TrainResult:
    step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def init_model(cfg: ModelConfig, std: float, seed: int) -> DeepseekModel:
    """fp32 weights ~ N(0, std), residual-branch outputs scaled down by sqrt(2 * layers) (GPT-2's
    rule, so the residual stream does not grow with depth), norms 1, correction bias 0."""
    torch.manual_seed(seed)
    model = DeepseekModel(cfg, dtype=torch.float32)
    residual_out = ("o_proj.weight", "down_proj.weight", "experts.down")
    for name, param in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            param.requires_grad_(False)  # moved by update_bias, never by a gradient
            param.data.zero_()
        elif param.dim() >= 2:
            scale = 1 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(residual_out) else 1
            torch.nn.init.normal_(param, std=std * scale)
        else:
            torch.nn.init.ones_(param)  # the RMSNorm weights
    return model.train()


def window_loss(model: DeepseekModel, windows: torch.Tensor, grad: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of windows [B, S + 1] (inputs :-1, targets 1:)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    B, S = inputs.shape
    batch = contiguous_batch([0] * B, [S] * B, S)
    caches = [torch.zeros(B * S, model.cfg.latent_dim, dtype=model.dtype)
              for _ in range(model.cfg.num_hidden_layers)]
    with torch.set_grad_enabled(grad):
        logits = model.forward_with_grad(inputs.reshape(-1), batch, caches, all_logits=True)
        return F.cross_entropy(logits, targets.reshape(-1))


@torch.no_grad()
def held_out_loss(model: DeepseekModel, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean loss over all windows (each window has the same length)."""
    total = 0.0
    for i in range(0, windows.shape[0], batch_size):
        part = windows[i : i + batch_size]
        total += float(window_loss(model, part, grad=False)) * part.shape[0]
    return total / windows.shape[0]


def learning_rate(tc: TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio over the steps (or the time
    budget, when tc has one)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.time_budget_s:
        progress = min(1.0, elapsed_s / tc.time_budget_s)
    else:
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)


def finished(tc: TrainConfig, result: TrainResult) -> bool:
    over_budget = tc.time_budget_s is not None and result.elapsed_s >= tc.time_budget_s
    return result.step >= tc.steps or over_budget


def _optimizer(model: DeepseekModel, tc: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=tc.lr, betas=(0.9, 0.95))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _update_biases(model: DeepseekModel, gamma: float) -> list[float]:
    """Move each MoE layer's correction bias against its step load; the loads' balancedness."""
    figures = []
    for layer in model.layers:
        if not layer.is_moe:
            continue
        bank, gate = layer.mlp.experts, layer.mlp.gate
        load = bank.token_counts.clone()
        figures.append(balancedness(load))
        gate.e_score_correction_bias.data = update_bias(gate.e_score_correction_bias.data,
                                                        load, gamma)
        bank.token_counts.zero_()
    return figures


def _zero_counts(model: DeepseekModel) -> None:
    for bank in model.expert_banks().values():
        bank.token_counts.zero_()


def train(raw_config: dict[str, Any], tc: TrainConfig, train_stream: TokenStream,
          held_stream: TokenStream, tokenizer: BackendTokenizer, work_dir: str | Path,
          out_dir: str | Path | None, resume: bool = False, time_limit_s: float | None = None,
          until_step: int | None = None, progress: bool = True) -> TrainResult:
    """Train to tc.steps, checkpointing as it goes; this run stops early, resumably, after
    time_limit_s or at until_step (the schedule is still tc.steps long)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_config)
    model = init_model(cfg, tc.init_std, tc.seed)
    opt = _optimizer(model, tc)
    result = TrainResult(step=0)
    state_path = work / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        result = TrainResult(state["step"], state["metrics"], state["elapsed_s"])
        log.info("resumed", step=result.step, state=str(state_path))
    held = eval_windows(held_stream, tc.seq_len, tc.eval_windows)

    def checkpoint() -> None:
        tmp = work / (STATE_FILE + ".partial")
        torch.save({"step": result.step, "model": model.state_dict(), "optim": opt.state_dict(),
                    "metrics": result.metrics, "elapsed_s": result.elapsed_s,
                    "train_config": tc.to_dict()}, tmp)
        tmp.replace(state_path)
        (work / METRICS_FILE).write_text(json.dumps(result.metrics, indent=1) + "\n")
        if out_dir is not None:
            save_checkpoint(model, raw_config, tokenizer, out_dir)

    started = time.monotonic()
    base_elapsed = result.elapsed_s
    last_checkpoint = started
    window_losses: list[float] = []
    window_balance: list[list[float]] = []
    window_start, window_tokens = time.monotonic(), 0
    bar = tqdm(total=tc.steps, initial=result.step, disable=not progress, unit="step",
               dynamic_ncols=True)
    _zero_counts(model)
    stop = tc.steps if until_step is None else min(tc.steps, until_step)
    while result.step < stop and not finished(tc, result):
        if time_limit_s is not None and time.monotonic() - started > time_limit_s:
            log.info("time limit reached", step=result.step)
            break
        windows = sample_windows(train_stream, tc.batch_size, tc.seq_len,
                                 _step_generator(tc.seed, result.step))
        for group in opt.param_groups:
            group["lr"] = learning_rate(tc, result.step, result.elapsed_s)
        loss = window_loss(model, windows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        window_balance.append(_update_biases(model, tc.bias_gamma))
        result.step += 1
        window_losses.append(loss.item())
        window_tokens += windows[:, 1:].numel()
        result.elapsed_s = base_elapsed + time.monotonic() - started
        bar.update(1)
        bar.set_postfix(loss=f"{window_losses[-1]:.3f}")
        if result.step % tc.eval_every == 0 or finished(tc, result):
            span = time.monotonic() - window_start
            row = {"step": result.step, "train_loss": sum(window_losses) / len(window_losses),
                   "held_out_loss": held_out_loss(model, held, tc.batch_size),
                   "tokens": result.step * tc.batch_size * tc.seq_len,
                   "elapsed_s": round(result.elapsed_s, 1),
                   "tokens_per_s": round(window_tokens / span, 1),
                   "balancedness": [round(sum(c) / len(c), 4) for c in zip(*window_balance,
                                                                            strict=True)]}
            _zero_counts(model)  # evaluation routed tokens too; they are not a training load
            result.metrics.append(row)
            log.info("eval", **row)
            bar.write(f"step {row['step']}: train {row['train_loss']:.3f} held-out "
                      f"{row['held_out_loss']:.3f} ({row['tokens_per_s']:.0f} tok/s)")
            window_losses, window_balance = [], []
            window_start, window_tokens = time.monotonic(), 0
        if time.monotonic() - last_checkpoint > tc.checkpoint_every_s:
            checkpoint()
            last_checkpoint = time.monotonic()
    bar.close()
    checkpoint()
    return result
