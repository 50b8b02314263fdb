"""Deterministic small checkpoints in Hugging Face format (same seed -> byte-identical files).

Weights are drawn from one seeded generator in a fixed order. Scales keep activations
well-conditioned: projections ~ N(0, 1/fan_in), residual outputs halved so the stream grows
slowly, router logits ~N(0, 1) so sigmoid scores spread without saturating (with a small
correction bias, every expert gets tokens on
random prompts), and an lm_head scale that spreads logits so near-ties are rare.

Two options shape a checkpoint like a published DeepSeek-V3 one: `fp8_block` quantises the
linear weights to FP8 in blocks (services/model/fp8.py), and `tokenizer_size` writes a
tokenizer that knows fewer ids than config.json's vocab_size (V3: 129,280 embedding rows,
about 128.8k tokens), and `mtp` adds V3's multi-token-prediction layer. None changes the
main model's drawn weights.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from services.model import fp8
from services.model.config import ModelConfig
from services.model.presets import PRESETS
from services.model.tokenizer_gen import MIN_VOCAB_SIZE, build_tokenizer, write_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The linears DeepSeek ships in FP8: attention projections and every MLP's (dense, shared,
# routed). Embeddings, lm_head, norms and the router gate stay in high precision.
FP8_LINEAR = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"\.weight$"
)


def _tensors(cfg: ModelConfig, g: torch.Generator) -> dict[str, torch.Tensor]:
    H = cfg.hidden_size
    out: dict[str, torch.Tensor] = {}

    def normal(name: str, shape: tuple[int, ...], std: float) -> None:
        out[name] = torch.randn(shape, generator=g) * std

    def linear(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        normal(name, (n_out, n_in), gain / math.sqrt(n_in))

    def norm(name: str, dim: int) -> None:
        out[name] = 1.0 + 0.1 * torch.randn(dim, generator=g)

    def mlp(prefix: str, inter: int) -> None:
        linear(f"{prefix}.gate_proj.weight", inter, H)
        linear(f"{prefix}.up_proj.weight", inter, H)
        linear(f"{prefix}.down_proj.weight", H, inter, gain=0.5)

    normal("model.embed_tokens.weight", (cfg.vocab_size, H), 1.0)
    # Tokens the tokenizer only reserves (vocab padding) get a weak output row, as a trained
    # model would, so generated text is made of real tokens.
    placeholders = [i for tok, i in build_tokenizer(cfg.vocab_size).get_vocab().items()
                    if "place▁holder" in tok]
    h = cfg.num_attention_heads

    def decoder_layer(i: int) -> None:
        p = f"model.layers.{i}"
        norm(f"{p}.input_layernorm.weight", H)
        norm(f"{p}.post_attention_layernorm.weight", H)
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            linear(f"{a}.q_proj.weight", h * cfg.qk_head_dim, H)
        else:
            linear(f"{a}.q_a_proj.weight", cfg.q_lora_rank, H)
            norm(f"{a}.q_a_layernorm.weight", cfg.q_lora_rank)
            linear(f"{a}.q_b_proj.weight", h * cfg.qk_head_dim, cfg.q_lora_rank, gain=2.0)
        linear(f"{a}.kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + cfg.qk_rope_head_dim, H)
        norm(f"{a}.kv_a_layernorm.weight", cfg.kv_lora_rank)
        linear(f"{a}.kv_b_proj.weight", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(f"{a}.o_proj.weight", H, h * cfg.v_head_dim, gain=0.5)
        if cfg.is_moe_layer(i):
            m = f"{p}.mlp"
            linear(f"{m}.gate.weight", cfg.n_routed_experts, H)
            out[f"{m}.gate.e_score_correction_bias"] = 0.01 * torch.randn(cfg.n_routed_experts, generator=g)
            for e in range(cfg.n_routed_experts):
                mlp(f"{m}.experts.{e}", cfg.moe_intermediate_size)
            if cfg.n_shared_experts:
                mlp(f"{m}.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            mlp(f"{p}.mlp", cfg.intermediate_size)

    for i in range(cfg.num_hidden_layers):
        decoder_layer(i)
    norm("model.norm.weight", H)
    linear("lm_head.weight", cfg.vocab_size, H, gain=4.0)
    out["lm_head.weight"][sorted(placeholders)] *= 0.05
    if cfg.num_nextn_predict_layers:  # drawn last: the main model's weights stay as they were
        n = cfg.num_hidden_layers
        decoder_layer(n)
        p = f"model.layers.{n}"
        norm(f"{p}.enorm.weight", H)
        norm(f"{p}.hnorm.weight", H)
        linear(f"{p}.eh_proj.weight", H, 2 * H)
        norm(f"{p}.shared_head.norm.weight", H)
        # V3 ships copies of the embedding and the head in its MTP layer; so do we
        out[f"{p}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"{p}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def make_model(preset: str, out_dir: str | Path, seed: int = 0,
               max_shard_bytes: int | None = None, fp8_block: int | None = None,
               tokenizer_size: int | None = None, mtp: bool = False) -> Path:
    """Write config.json, safetensors and the tokenizer; fp8_block quantises (square blocks);
    mtp adds one multi-token-prediction layer (num_nextn_predict_layers 1, as V3 ships)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (one of {sorted(PRESETS)})")
    if fp8_block is not None and fp8_block <= 0:
        raise ValueError(f"fp8_block must be > 0, got {fp8_block}")
    raw = dict(PRESETS[preset])
    if mtp:
        raw["num_nextn_predict_layers"] = 1
    cfg = ModelConfig.from_dict(raw)
    if tokenizer_size is not None and not MIN_VOCAB_SIZE <= tokenizer_size <= cfg.vocab_size:
        raise ValueError(f"tokenizer_size must be in [{MIN_VOCAB_SIZE}, {cfg.vocab_size}] "
                         f"(vocab_size), got {tokenizer_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[raw["torch_dtype"]]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in _tensors(cfg, g).items():
        if fp8_block is not None and FP8_LINEAR.search(k):
            q, scale_inv = fp8.quantize(v, (fp8_block, fp8_block))
            tensors[k], tensors[fp8.scale_key(k)] = q.contiguous(), scale_inv.contiguous()
        else:
            tensors[k] = (v.float() if ".mlp.gate." in k else v.to(dtype)).contiguous()
    if fp8_block is not None:
        raw["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8",
                                      "weight_block_size": [fp8_block, fp8_block]}
    (out / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    _save(tensors, out, max_shard_bytes)
    write_tokenizer(out, cfg.vocab_size if tokenizer_size is None else tokenizer_size)
    return out


def _save(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None) -> None:
    for old in list(out.glob("*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    meta = {"format": "pt"}
    if not max_shard_bytes:
        save_file(tensors, out / "model.safetensors", metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
