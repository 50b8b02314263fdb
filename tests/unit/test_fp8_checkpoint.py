"""FP8 checkpoints, as DeepSeek ships V3: `make-model --fp8` writes them; attention instances
and expert workers load them dequantised; a bad or missing scale fails the load by name."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.cli import main as epserve
from services.common.errors import CheckpointError
from services.model.checkpoint_gen import FP8_LINEAR, make_model
from services.model.config import ModelConfig
from services.model.deepseek import no_experts
from services.model.loader import LoadReport, load_expert_banks, load_model
from tests.fp8_reference import dequantize_by_blocks, read_dequantized

BLOCK = 24  # no dimension of the tiny preset is a multiple: partial blocks everywhere


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("fp8"), seed=0, fp8_block=BLOCK)


@pytest.fixture(scope="module")
def dequantized(fp8_dir):
    return read_dequantized(fp8_dir)


def test_generator_writes_deepseek_fp8_layout(fp8_dir, tiny_model_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                             "quant_method": "fp8",
                                             "weight_block_size": [BLOCK, BLOCK]}
    plain = load_file(tiny_model_dir / "model.safetensors")
    written = load_file(fp8_dir / "model.safetensors")
    quantized = {k for k in plain if FP8_LINEAR.search(k)}
    assert quantized and set(written) == set(plain) | {k + "_scale_inv" for k in quantized}
    for key, want in plain.items():
        t = written[key]
        if key not in quantized:  # embeddings, lm_head, norms, router gate and its bias
            assert t.dtype == want.dtype and torch.equal(t, want), key
            continue
        scale = written[key + "_scale_inv"]
        rows, cols = want.shape
        assert t.dtype == torch.float8_e4m3fn and t.shape == want.shape, key
        assert scale.dtype == torch.float32
        assert tuple(scale.shape) == (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), key
        # scale_inv = amax / 448 of the block of the unquantised (float32 preset) weight
        last = want[(scale.shape[0] - 1) * BLOCK:, (scale.shape[1] - 1) * BLOCK:]
        assert scale[-1, -1].item() == pytest.approx(last.abs().max().item() / 448, rel=1e-6)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                "model.layers.1.mlp.gate.e_score_correction_bias", "model.norm.weight"):
        assert key not in quantized
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantized
    assert "model.layers.0.self_attn.kv_b_proj.weight" in quantized


def test_cli_fp8_uses_128_blocks_by_default_and_loads(tmp_path, dequantized):
    out = tmp_path / "cli"
    assert epserve(["make-model", "--preset", "tiny", "--fp8", "--out", str(out)]) == 0
    quant = ModelConfig.from_dir(out).fp8_weight_block
    assert quant == (128, 128)
    with safe_open(out / "model.safetensors", "pt") as f:
        # every tiny dimension is below 128: one partial block per weight
        assert tuple(f.get_tensor("model.layers.0.self_attn.q_b_proj.weight_scale_inv").shape) == (1, 1)
    model = load_model(out)
    cli_weights = read_dequantized(out)
    for key, value in model.state_dict().items():
        if key in cli_weights:
            assert torch.equal(value, cli_weights[key]), key
    # A coarser block is a different quantisation of the same draw: close, not equal.
    key = "model.layers.0.self_attn.q_b_proj.weight"
    assert not torch.equal(cli_weights[key], dequantized[key])
    assert torch.allclose(cli_weights[key], dequantized[key], rtol=0.15, atol=1e-2)


def _expert(dequantized, layer, e):
    p = f"model.layers.{layer}.mlp.experts.{e}"
    gate_up = torch.cat([dequantized[f"{p}.gate_proj.weight"], dequantized[f"{p}.up_proj.weight"]])
    return gate_up, dequantized[f"{p}.down_proj.weight"]


def test_full_load_computes_with_the_dequantized_weights(fp8_dir, dequantized):
    model = load_model(fp8_dir)
    state = model.state_dict()
    for key, value in state.items():
        if key in dequantized:
            assert value.dtype == torch.float32 and torch.equal(value, dequantized[key]), key
    for layer, bank in model.expert_banks().items():
        for i, e in enumerate(bank.keys):
            gate_up, down = _expert(dequantized, layer, e)
            assert torch.equal(bank.gate_up[i], gate_up) and torch.equal(bank.down[i], down)
    bf16 = load_model(fp8_dir, dtype="bfloat16").state_dict()
    key = "model.layers.2.self_attn.o_proj.weight"
    assert torch.equal(bf16[key], dequantized[key].to(torch.bfloat16))


def test_attention_instance_loads_dequantized_non_expert_weights(fp8_dir, dequantized):
    cfg = ModelConfig.from_dir(fp8_dir)
    report = LoadReport()
    model = load_model(fp8_dir, experts=no_experts(cfg), report=report)
    assert not report.expert_entries
    scales = [k for k in report.tensors_read if k.endswith("_scale_inv")]
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in scales
    assert not [k for k in scales if ".experts." in k]
    for key, value in model.state_dict().items():
        if key in dequantized:
            assert torch.equal(value, dequantized[key]), key


def test_expert_worker_loads_its_experts_dequantized(fp8_dir, dequantized):
    cfg = ModelConfig.from_dir(fp8_dir)
    layout = {layer: [(0, 5), (1, 11), (2, 2)] for layer in cfg.moe_layer_ids}
    report = LoadReport()
    banks = load_expert_banks(fp8_dir, layout, report=report)
    for layer, entries in layout.items():
        for i, (_, e) in enumerate(entries):
            gate_up, down = _expert(dequantized, layer, e)
            assert torch.equal(banks[layer].gate_up[i], gate_up)
            assert torch.equal(banks[layer].down[i], down)
    read = {k for k in report.tensors_read if ".experts." in k}
    assert read and all(any(f".experts.{e}." in k for e in (5, 11, 2)) for k in read)


def _fuse_experts(src, dst, cfg):
    """The fused layout (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]), quantised per
    expert matrix in BLOCK blocks, as a transformers-style FP8 checkpoint stores it."""
    from services.model import fp8

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    plain = read_dequantized(src)
    for layer in cfg.moe_layer_ids:
        p = f"model.layers.{layer}.mlp.experts"
        for e in range(cfg.n_routed_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "weight_scale_inv"):
                    del tensors[f"{p}.{e}.{name}.{suffix}"]
        for fused, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            pairs = [fp8.quantize(torch.cat([plain[f"{p}.{e}.{n}.weight"] for n in parts]),
                                  (BLOCK, BLOCK)) for e in range(cfg.n_routed_experts)]
            tensors[f"{p}.{fused}"] = torch.stack([q for q, _ in pairs]).contiguous()
            tensors[f"{p}.{fused}_scale_inv"] = torch.stack([s for _, s in pairs]).contiguous()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_expert_worker_dequantizes_rows_of_fused_fp8_experts(fp8_dir, tmp_path):
    cfg = ModelConfig.from_dir(fp8_dir)
    fused_dir = _fuse_experts(fp8_dir, tmp_path / "fused", cfg)
    with safe_open(fused_dir / "model.safetensors", "pt") as f:
        layer = cfg.moe_layer_ids[-1]
        q = f.get_tensor(f"model.layers.{layer}.mlp.experts.gate_up_proj")
        scale = f.get_tensor(f"model.layers.{layer}.mlp.experts.gate_up_proj_scale_inv")
        dq = f.get_tensor(f"model.layers.{layer}.mlp.experts.down_proj")
        dscale = f.get_tensor(f"model.layers.{layer}.mlp.experts.down_proj_scale_inv")
    report = LoadReport()
    banks = load_expert_banks(fused_dir, {layer: [(0, 9), (1, 4)]}, report=report)
    for i, e in enumerate((9, 4)):
        assert torch.equal(banks[layer].gate_up[i], dequantize_by_blocks(q[e], scale[e], (BLOCK, BLOCK)))
        assert torch.equal(banks[layer].down[i], dequantize_by_blocks(dq[e], dscale[e], (BLOCK, BLOCK)))
    assert f"model.layers.{layer}.mlp.experts.gate_up_proj_scale_inv[9]" in report.tensors_read
    # the full model reads the same rows the same way
    full = load_model(fused_dir).layers[layer].mlp.experts
    assert torch.equal(full.gate_up[9], banks[layer].gate_up[0])


def _copy_with(tmp_path, src, mutate, config=None):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    mutate(tensors)
    save_file(tensors, dst / "model.safetensors")
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        config(raw)
        (dst / "config.json").write_text(json.dumps(raw))
    return dst


ATTN = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
EXPERT = "model.layers.2.mlp.experts.7.up_proj.weight"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _poison(key, value):
    def mutate(t):
        t[key] = t[key].clone()
        t[key][-1, -1] = value
    return mutate


@pytest.mark.parametrize("key", [ATTN, EXPERT])
def test_missing_scale_fails_naming_the_tensor(fp8_dir, tmp_path, key):
    dst = _copy_with(tmp_path, fp8_dir, lambda t: t.pop(key + "_scale_inv"))
    with pytest.raises(CheckpointError, match=f"'{key}' is float8_e4m3fn but its scale "
                                              f"'{key}_scale_inv' is missing"):
        load_model(dst)


@pytest.mark.parametrize("key", [ATTN, EXPERT])
def test_misshaped_scale_fails_naming_the_tensor(fp8_dir, tmp_path, key):
    dst = _copy_with(tmp_path, fp8_dir, _set(key + "_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=f"'{key}_scale_inv' has shape \\(1, 1\\)"):
        load_model(dst)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_fails_the_attention_and_the_expert_load(fp8_dir, tmp_path, bad):
    dst = _copy_with(tmp_path, fp8_dir, lambda t: (_poison(ATTN + "_scale_inv", bad)(t),
                                                    _poison(EXPERT + "_scale_inv", bad)(t)))
    cfg = ModelConfig.from_dir(dst)
    with pytest.raises(CheckpointError, match=f"'{ATTN}_scale_inv' holds 1 non-finite"):
        load_model(dst, experts=no_experts(cfg))
    with pytest.raises(CheckpointError, match=f"'{EXPERT}_scale_inv' holds 1 non-finite"):
        load_expert_banks(dst, {2: [(0, 7)]})
    load_expert_banks(dst, {2: [(0, 6)]})  # experts whose scales are sound still load


def test_fp8_without_quantization_config_fails(fp8_dir, tmp_path):
    dst = _copy_with(tmp_path, fp8_dir, lambda t: None,
                     config=lambda raw: raw.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="is float8_e4m3fn but config.json has no "
                                              "quantization_config"):
        load_model(dst)


def test_stray_scales_are_errors(tiny_model_dir, tmp_path):
    orphan = "model.layers.0.self_attn.bogus.weight_scale_inv"
    dst = _copy_with(tmp_path, tiny_model_dir, _set(orphan, torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{orphan}'"):
        load_model(dst)
    shutil.rmtree(dst)
    dst = _copy_with(tmp_path, tiny_model_dir, _set(ATTN + "_scale_inv", torch.ones(2, 3)))
    with pytest.raises(CheckpointError, match=f"'{ATTN}' is torch.float32 but has a scale"):
        load_model(dst)
