"""FP8 dequantisation written out from its definition, apart from services/model/fp8.py.

Tests compare what the loader computes with this, and feed transformers a copy of an FP8
checkpoint dequantised by it, so the loader's math is checked against an independent one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SCALE = "_scale_inv"


def dequantize_by_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """W[i, j] = q[i, j] * scale_inv[i // br, j // bc], one block at a time (float32)."""
    out = torch.empty(q.shape)
    for bi in range(scale_inv.shape[0]):
        for bj in range(scale_inv.shape[1]):
            rows = slice(bi * block[0], (bi + 1) * block[0])
            cols = slice(bj * block[1], (bj + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * scale_inv[bi, bj].item()
    return out


def read_dequantized(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a single-file checkpoint, fp8 ones dequantised, scales dropped."""
    block = json.loads((model_dir / "config.json").read_text())["quantization_config"][
        "weight_block_size"]
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for key, t in raw.items():
        if key.endswith(SCALE):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = raw[key + SCALE]
            if t.dim() == 3:  # fused experts: one [rows, cols] matrix per expert
                t = torch.stack([dequantize_by_blocks(t[e], scale[e], block)
                                 for e in range(t.shape[0])])
            else:
                t = dequantize_by_blocks(t, scale, block)
        out[key] = t
    return out


def write_dequantized_copy(src: Path, dst: Path) -> Path:
    """The same model with float32 weights and no quantization_config (for transformers)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.float().contiguous() for k, v in read_dequantized(src).items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
