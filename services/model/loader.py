"""Load a DeepSeek-V2/V3 checkpoint (config.json + safetensors, single or sharded).

Only the tensors the process holds are read: safetensors files are memory-mapped and each
tensor (or one expert's slice of a fused expert tensor) is read on its own, so a worker that
holds 1/8 of the routed experts never materialises the rest. Unknown and missing tensors are
errors that name the key. FP8 block-quantised weights (e4m3 with a `weight_scale_inv` per
block, as DeepSeek publishes V3; the block size from config.json's `quantization_config`) are
dequantised on load into the compute dtype (services/model/fp8.py), on every path: whole
tensors and one expert's row of a fused expert tensor alike.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from services.common.errors import CheckpointError
from services.model import fp8
from services.model.config import ModelConfig
from services.model.deepseek import DeepseekModel, ExpertKeys, all_experts
from services.model.moe import ExpertBank
from services.model.mtp import MTP_SHARED_FALLBACK, attach_mtp, mtp_checkpoint_key

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16}
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
FLOAT8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                 torch.float8_e5m2fnuz}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r} (one of {sorted(DTYPES)})")
    return DTYPES[name]


@dataclass
class LoadReport:
    """What a load read from disk: used by tests to prove a worker holds only its experts."""

    tensors_read: list[str] = field(default_factory=list)
    expert_entries: list[tuple[int, int]] = field(default_factory=list)  # (layer, logical expert)
    bytes_read: int = 0


class CheckpointIndex:
    """Which safetensors file holds each tensor."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc})") from exc
            self.file_of = {k: model_dir / v for k, v in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {model_dir}")
            self.file_of = {}
            for path in files:
                with safe_open(path, "pt") as f:
                    for key in f.keys():
                        self.file_of[key] = path
        for path in set(self.file_of.values()):
            if not path.is_file():
                raise CheckpointError(f"checkpoint shard {path.name} is missing")

    def keys(self) -> Iterable[str]:
        return self.file_of.keys()


class TensorReader:
    """Reads single tensors or slices, keeping each file open once; FP8 comes out dequantised.

    fp8_block is the checkpoint's scale block (config.json); None means no tensor may be fp8.
    """

    def __init__(self, index: CheckpointIndex, report: LoadReport,
                 fp8_block: tuple[int, int] | None = None) -> None:
        self.index, self.report, self.fp8_block = index, report, fp8_block
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, key: str):
        if key not in self.index.file_of:
            raise CheckpointError(f"missing tensor {key!r}")
        path = self.index.file_of[key]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, "pt"))
        return self._open[path]

    def has(self, key: str) -> bool:
        return key in self.index.file_of

    def _raw(self, key: str, row: int | None) -> torch.Tensor:
        f = self._file(key)
        t = f.get_tensor(key) if row is None else f.get_slice(key)[row]
        self.report.tensors_read.append(key if row is None else f"{key}[{row}]")
        self.report.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, key: str, row: int | None = None) -> torch.Tensor:
        """The tensor `key` (or its row `row`, one expert of a fused tensor) in full precision."""
        t = self._raw(key, row)
        scale = fp8.scale_key(key)
        if t.dtype not in FLOAT8_DTYPES:
            if self.has(scale):
                raise CheckpointError(f"tensor {key!r} is {t.dtype} but has a scale {scale!r}; "
                                      "only float8_e4m3fn weights are scaled")
            return t
        if t.dtype != fp8.FP8_DTYPE:
            raise CheckpointError(f"tensor {key!r} is {t.dtype}; only float8_e4m3fn is supported")
        if self.fp8_block is None:
            raise CheckpointError(f"tensor {key!r} is float8_e4m3fn but config.json has no "
                                  "quantization_config")
        # DeepSeek's fp8_cast_bf16.py only warns here and keeps the raw fp8 codes, which
        # serves a silently corrupted model; a load fails instead.
        if not self.has(scale):
            raise CheckpointError(f"tensor {key!r} is float8_e4m3fn but its scale {scale!r} "
                                  "is missing")
        at = "" if row is None else f"[{row}]"
        return fp8.dequantize(t, self._raw(scale, row), self.fp8_block, key + at, scale + at)


def _ignored(key: str, cfg: ModelConfig, index: CheckpointIndex, mtp: bool) -> bool:
    """Tensors that are legitimately present but unused: multi-token-prediction layers (all of
    them, or those past the first when the first is loaded), scales."""
    m = LAYER_KEY.match(key)
    if m and int(m.group(1)) >= cfg.num_hidden_layers + (1 if mtp else 0):
        return True
    if key.endswith(fp8.SCALE_SUFFIX) and key.removesuffix(fp8.SCALE_SUFFIX) in index.file_of:
        return True  # read with its weight; an orphan scale is unexpected
    return key.endswith("rotary_emb.inv_freq")


def load_model(
    model_dir: str | Path,
    experts: ExpertKeys | None = None,
    expert_logical: dict[int, dict[int, int]] | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    report: LoadReport | None = None,
    mtp: bool = False,
) -> DeepseekModel:
    """Build the model holding `experts` (layer -> keys; default all) and read its tensors.

    expert_logical maps layer -> key -> logical expert for keys that are not logical ids
    (an expert worker's physical slots); by default a key is its logical id. mtp: also load
    the first multi-token-prediction layer as `model.mtp` (the speculative draft), with all of
    its routed experts.
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    experts = all_experts(cfg) if experts is None else experts
    for layer, keys in experts.items():
        if not cfg.is_moe_layer(layer):
            raise CheckpointError(f"layer {layer} is not a MoE layer")
        logical = (expert_logical or {}).get(layer, {})
        for k in keys:
            if not 0 <= logical.get(k, k) < cfg.n_routed_experts:
                raise CheckpointError(f"layer {layer}: expert {logical.get(k, k)} out of range")
    report = report if report is not None else LoadReport()
    index = CheckpointIndex(model_dir)
    if mtp and cfg.num_nextn_predict_layers < 1:
        raise CheckpointError(f"{model_dir} has no multi-token-prediction layer "
                              "(num_nextn_predict_layers is 0): it cannot draft for MTP")
    with torch.device("meta"):
        model = DeepseekModel(cfg, experts, dtype)
        if mtp:
            attach_mtp(model)
    expected = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k}
    state: dict[str, torch.Tensor] = {}
    read: set[str] = set()
    with TensorReader(index, report, cfg.fp8_weight_block) as reader:
        for key, meta in expected.items():
            source = _source_key(key, cfg, reader)
            tensor = reader.read(source)
            read.add(source)
            if tuple(tensor.shape) != tuple(meta.shape):
                raise CheckpointError(
                    f"tensor {source!r} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(meta.shape)}")
            state[key] = tensor.to(meta.dtype)
        for key in index.keys():
            if key in read or _ignored(key, cfg, index, mtp):
                continue
            if EXPERT_KEY.match(key) or FUSED_EXPERT_KEY.match(key):
                continue
            raise CheckpointError(f"unexpected tensor {key!r} in checkpoint")
        for layer, bank in model.expert_banks().items():
            logical = (expert_logical or {}).get(layer, {})
            gate_up, down = _read_experts(reader, cfg, layer, [logical.get(k, k) for k in bank.keys],
                                          dtype, report)
            state[f"model.layers.{layer}.mlp.experts.gate_up"] = gate_up
            state[f"model.layers.{layer}.mlp.experts.down"] = down
        if mtp and model.mtp.is_moe:
            n = cfg.num_hidden_layers
            state["mtp.mlp.experts.gate_up"], state["mtp.mlp.experts.down"] = _read_experts(
                reader, cfg, n, list(range(cfg.n_routed_experts)), dtype, report)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def _source_key(key: str, cfg: ModelConfig, reader: TensorReader) -> str:
    """The checkpoint tensor a model parameter is read from."""
    if key.startswith("mtp."):
        source = mtp_checkpoint_key(cfg, key)
        if reader.has(source) or key not in MTP_SHARED_FALLBACK:
            return source
        key = MTP_SHARED_FALLBACK[key]
    if key == "lm_head.weight" and not reader.has(key) and cfg.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return key


def load_expert_banks(
    model_dir: str | Path,
    layout: dict[int, list[tuple[int, int]]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    report: LoadReport | None = None,
) -> dict[int, ExpertBank]:
    """Only routed experts: layer -> [(key, logical expert)]. An expert worker's whole load."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    report = report if report is not None else LoadReport()
    banks: dict[int, ExpertBank] = {}
    with TensorReader(CheckpointIndex(model_dir), report, cfg.fp8_weight_block) as reader:
        for layer, entries in sorted(layout.items()):
            if not cfg.is_moe_layer(layer):
                raise CheckpointError(f"layer {layer} is not a MoE layer")
            for _, logical in entries:
                if not 0 <= logical < cfg.n_routed_experts:
                    raise CheckpointError(f"layer {layer}: expert {logical} out of range")
            bank = ExpertBank([k for k, _ in entries], cfg.hidden_size, cfg.moe_intermediate_size,
                              dtype)
            gate_up, down = _read_experts(reader, cfg, layer, [e for _, e in entries], dtype, report)
            bank.gate_up.data, bank.down.data = gate_up, down
            banks[layer] = bank.to(device)
    return banks


def _read_experts(reader: TensorReader, cfg: ModelConfig, layer: int, logical_ids: list[int],
                  dtype: torch.dtype, report: LoadReport) -> tuple[torch.Tensor, torch.Tensor]:
    H, inter = cfg.hidden_size, cfg.moe_intermediate_size
    n = len(logical_ids)
    gate_up = torch.empty(n, 2 * inter, H, dtype=dtype)
    down = torch.empty(n, H, inter, dtype=dtype)
    prefix = f"model.layers.{layer}.mlp.experts"
    fused = reader.has(f"{prefix}.gate_up_proj")
    for i, e in enumerate(logical_ids):
        if fused:
            gu = reader.read(f"{prefix}.gate_up_proj", row=e)
            dn = reader.read(f"{prefix}.down_proj", row=e)
        else:
            g = reader.read(f"{prefix}.{e}.gate_proj.weight")
            u = reader.read(f"{prefix}.{e}.up_proj.weight")
            gu, dn = torch.cat([g, u], dim=0), reader.read(f"{prefix}.{e}.down_proj.weight")
        if tuple(gu.shape) != (2 * inter, H) or tuple(dn.shape) != (H, inter):
            raise CheckpointError(f"{prefix}.{e}: expert weights have the wrong shape")
        gate_up[i], down[i] = gu.to(dtype), dn.to(dtype)
        report.expert_entries.append((layer, e))
    return gate_up, down
