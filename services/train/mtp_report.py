"""What a trained MTP layer achieves, measured as it is served (held-out prompts through the
reference engine with and without the draft), and its section of the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.model.loader import load_model
from services.train.windows import TokenStream

SECTION = "## MTP draft layer"


def held_out_prompts(stream: TokenStream, count: int, length: int) -> list[list[int]]:
    """count prompts of BOS + length tokens from line starts spread evenly over the stream."""
    usable = stream.line_starts[stream.line_starts + length <= len(stream)]
    pick = torch.linspace(0, usable.numel() - 1, count).round().long()
    return [[stream.bos_id, *stream.ids[s: s + length].tolist()] for s in usable[pick].tolist()]


def measure_speculation(model_dir: str | Path, prompts: list[list[int]],
                        max_tokens: int) -> dict[str, Any]:
    """Greedy generation of every prompt with and without the MTP draft (the checkpoint as
    served); raises unless the outputs are identical."""
    from services.engine.reference import GenerationRequest, ReferenceEngine, mtp_drafter
    from services.engine.sampling import SamplingParams

    model = load_model(model_dir, mtp=True)
    reqs = [GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    plain_engine = ReferenceEngine(model)
    plain = plain_engine.generate(reqs)
    spec = ReferenceEngine(model, drafter=mtp_drafter(model))
    drafted = spec.generate(reqs)
    if [c.token_ids for c in plain] != [c.token_ids for c in drafted]:
        raise AssertionError("speculative decoding changed the greedy output")
    d, s = spec.stats.drafts, spec.stats
    return {"prompts": len(prompts), "prompt_tokens": len(prompts[0]), "max_tokens": max_tokens,
            "outputs_identical": True, "acceptance": round(d.acceptance(), 4),
            "tokens_per_step": round(d.tokens_per_step, 3), "drafts_proposed": d.proposed[0],
            "drafts_accepted": d.accepted[0], "decode_steps": s.decode_steps,
            "decode_steps_without_draft": plain_engine.stats.decode_steps}


def mtp_card(m: dict[str, Any]) -> str:
    tc, h, sp = m["train_config"], m["held_out"], m["speculation"]
    return f"""{SECTION}

`model.layers.{m['layer']}.*` is a DeepSeek-V3 multi-token-prediction layer
(`num_nextn_predict_layers: 1`), trained afterwards with the main model frozen, for
speculative decoding (`load_model(..., mtp=True)`, `ReferenceEngine(model,
drafter=mtp_drafter(model))`). It has no embedding or head of its own: it shares the main
model's. Loaded without `mtp=True` the checkpoint is the main model, unchanged.

Recipe (services/train/mtp_trainer.py): the decoder layer copied from layer
{m['layer'] - 1}, enorm/hnorm/shared_head.norm from the final norm, eh_proj passing the hidden
half through; loss the cross-entropy of t+2 at each position, the MTP layer attending
{_context(tc)};
AdamW lr {tc['lr']} ({tc['warmup_steps']} warm-up steps, cosine to {tc['min_lr_ratio']} x over
{tc['time_budget_s'] or tc['steps']:g} {'s' if tc['time_budget_s'] else 'steps'}), {tc['batch_size']} windows
of {tc['seq_len']} tokens per step from the training works, bias rule x {tc['bias_gamma']}, seed
{tc['seed']}, fp32 on {tc['threads']} CPU threads: {m['steps']} steps in {m['train_minutes']}
minutes; {m['parameters']:,} parameters, bf16 (gate fp32); model.safetensors with it
{m['safetensors_mb']} MB.

| held-out ({h['windows']} windows of {tc['seq_len']}) | |
|---|---|
| main model, next-token loss | {h['main']:.3f} |
| MTP layer, t+2 loss | {h['mtp']:.3f} |
| MTP argmax = main argmax at the next position | {h['agree']:.1%} |

Greedy generation, {sp['prompts']} held-out prompts of {sp['prompt_tokens']} tokens (BOS included) x
{sp['max_tokens']} tokens, reference engine, with and without the draft (identical outputs):
**acceptance {sp['acceptance']:.1%}, {sp['tokens_per_step']:.2f} tokens per decode step**
({sp['decode_steps']} decode steps instead of {sp['decode_steps_without_draft']}).

```
{m['command']}
```
"""


def _context(tc: dict[str, Any]) -> str:
    if tc["context"] is None:
        return "causally over the whole window (as served: prefill runs it over the prompt)"
    return f"over segments of {tc['context']} positions"


def write_card(model_dir: str | Path, summary: dict[str, Any]) -> None:
    """train_summary.json's "mtp" entry and the card's section (replacing earlier ones)."""
    out = Path(model_dir)
    path = out / "train_summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["mtp"] = summary
    path.write_text(json.dumps(data, indent=1) + "\n")
    card_path = out / "README.md"
    card = card_path.read_text() if card_path.is_file() else ""
    head, _, rest = card.partition(SECTION)
    tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
    card_path.write_text(head.rstrip("\n") + "\n\n" + mtp_card(summary) + tail)


# ---- entry point ----
