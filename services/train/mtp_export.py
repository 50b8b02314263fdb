"""Writing a trained MTP layer into its checkpoint: layer N's tensors added to
model.safetensors (every existing tensor kept byte for byte) and num_nextn_predict_layers 1
in config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from services.model.deepseek import DeepseekModel
from services.model.loader import parse_dtype
from services.model.mtp import mtp_checkpoint_key

_BANK = re.compile(r"^mlp\.experts\.(gate_up|down)$")


def mtp_tensors(model: DeepseekModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The MTP layer's checkpoint tensors (model.layers.{N}.*): per-expert projections, the
    gate in fp32, the rest in dtype; no embedding or head when they are the main model's."""
    mtp, cfg = model.mtp, model.cfg
    shared = {"embed_tokens.weight": model.model.embed_tokens.weight,
              "shared_head.head.weight": model.lm_head.weight}
    inter = cfg.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for key, t in mtp.state_dict(keep_vars=True).items():
        t = t.detach()
        if key in shared and t.data_ptr() == shared[key].data_ptr():
            continue
        name = mtp_checkpoint_key(cfg, "mtp." + key)
        bank = _BANK.match(key)
        if bank is None:
            out[name] = t.to(torch.float32 if ".mlp.gate." in name else dtype).contiguous()
            continue
        prefix = name.removesuffix("." + bank.group(1))
        for i, e in enumerate(mtp.mlp.experts.keys):
            if bank.group(1) == "gate_up":
                out[f"{prefix}.{e}.gate_proj.weight"] = t[i, :inter].to(dtype).contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = t[i, inter:].to(dtype).contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[i].to(dtype).contiguous()
    return out


def export_mtp(model: DeepseekModel, model_dir: str | Path) -> Path:
    """Write the MTP layer into model_dir's single model.safetensors (replacing a previous MTP
    layer, every other tensor kept byte for byte) and set num_nextn_predict_layers to 1."""
    out = Path(model_dir)
    path, config_path = out / "model.safetensors", out / "config.json"
    raw = json.loads(config_path.read_text())
    prefix = f"model.layers.{model.cfg.num_hidden_layers}."
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(prefix)}
    added = mtp_tensors(model, parse_dtype(raw["torch_dtype"]))
    tmp = out / "model.safetensors.partial"
    save_file({**kept, **added}, tmp, metadata=metadata)
    with safe_open(tmp, "pt") as f:  # the main model's tensors are untouched
        for k, t in kept.items():
            if not _same_bytes(f.get_tensor(k), t):
                raise AssertionError(f"{k} changed on export")
    tmp.chmod(0o644)
    tmp.replace(path)
    raw["num_nextn_predict_layers"] = 1
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return path


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


# ---- measurement and the model card ----
