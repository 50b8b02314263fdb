"""Generated checkpoints: deterministic, real HF format, V3 topology, well-conditioned."""

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from services.engine.kv_cache import LatentKVCache, SeqChunk
from services.model.config import ModelConfig
from services.model.loader import load_model


def test_same_seed_gives_byte_identical_files(tiny_model_dir, tmp_path):
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "services.cli", "make-model", "--preset", "tiny",
                    "--out", str(out), "--seed", "0"], check=True, capture_output=True)
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (tiny_model_dir / name).read_bytes() == (out / name).read_bytes(), name


def test_transformers_loads_it_and_agrees(tiny_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    ids = tok("Hello there, general Kenobi")["input_ids"]
    ours = load_model(tiny_model_dir)
    cache = LatentKVCache(ours.cfg.num_hidden_layers, ours.cfg.latent_dim, 4, 16)
    got = ours(torch.tensor(ids), cache.batch([SeqChunk("a", 0, len(ids))]), cache.layers,
               all_logits=True)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-3


def test_v3_mini_keeps_deepseek_v3_routing_topology(mini_model_dir):
    cfg = ModelConfig.from_dir(mini_model_dir)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group) == (256, 8, 8, 4)
    assert cfg.n_shared_experts == 1 and cfg.scoring_func == "sigmoid"
    assert cfg.topk_method == "noaux_tc" and cfg.q_lora_rank is not None
    assert cfg.first_k_dense_replace == 1 and cfg.rope.kind == "yarn"
    model = load_model(mini_model_dir)
    params = sum(p.numel() for p in model.parameters())
    assert 20e6 <= params <= 60e6, params


def test_v3_mini_is_well_conditioned(mini_model_dir):
    """Random prompts: finite logits, and every routed expert of every layer gets tokens."""
    model = load_model(mini_model_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, model.cfg.vocab_size, (128,), generator=g).tolist() for _ in range(8)]
    cache = LatentKVCache(model.cfg.num_hidden_layers, model.cfg.latent_dim, 16, 64)
    batch = cache.batch([SeqChunk(str(i), 0, len(p)) for i, p in enumerate(prompts)])
    logits = model(torch.tensor([t for p in prompts for t in p]), batch, cache.layers, all_logits=True)
    assert torch.isfinite(logits).all()
    assert logits.std() > 1.0, "logits too flat: near-ties everywhere"
    for layer, bank in model.expert_banks().items():
        idle = (bank.token_counts == 0).sum().item()
        assert idle == 0, f"layer {layer}: {idle} experts got no token"
