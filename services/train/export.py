"""A trained DeepseekModel written as a Hugging Face checkpoint directory.

The inverse of services/model/loader.py: every tensor under its HF name, each routed expert
split back out of the stacked ExpertBank (gate_up [n, 2I, H] -> experts.E.gate_proj / up_proj,
down [n, H, I] -> experts.E.down_proj), weights in config.json's torch_dtype except the router
gate (weight and correction bias), which stays fp32 as DeepSeek ships it and as the model runs it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from services.model.deepseek import DeepseekModel
from services.model.loader import parse_dtype
from services.train.bpe import write_tokenizer_files

_BANK_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up|down)$")


def hf_state_dict(model: DeepseekModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    inter = model.cfg.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach()
        bank = _BANK_KEY.match(key)
        if bank is None:
            keep_fp32 = ".mlp.gate." in key
            out[key] = tensor.to(torch.float32 if keep_fp32 else dtype).contiguous()
            continue
        prefix, which = bank.groups()
        experts = model.get_submodule(prefix)
        for i, expert in enumerate(experts.keys):
            if which == "gate_up":
                out[f"{prefix}.{expert}.gate_proj.weight"] = tensor[i, :inter].to(dtype).contiguous()
                out[f"{prefix}.{expert}.up_proj.weight"] = tensor[i, inter:].to(dtype).contiguous()
            else:
                out[f"{prefix}.{expert}.down_proj.weight"] = tensor[i].to(dtype).contiguous()
    return out


def save_checkpoint(model: DeepseekModel, raw_config: dict[str, Any], tokenizer: Tokenizer,
                    out_dir: str | Path) -> Path:
    """config.json, model.safetensors and the tokenizer files; written to a temporary name
    first, so an interrupted export never leaves a half-written model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(raw_config["torch_dtype"])
    tmp = out / "model.safetensors.partial"
    save_file(hf_state_dict(model, dtype), tmp, metadata={"format": "pt"})
    tmp.chmod(0o644)  # a file meant for the repository, readable like the rest
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(raw_config, indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(out, tokenizer)
    return out
