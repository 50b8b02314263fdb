"""Model configuration read from a Hugging Face DeepSeek-V2/V3 `config.json`.

Every behaviour is read from the config (never inferred from names or sizes). Both the
transformers-4 layout (`rope_theta` + `rope_scaling`) and the transformers-5 layout
(`rope_parameters`) are accepted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.common.errors import ConfigError

ARCHITECTURES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("default", "yarn"):
            raise ConfigError(f"rope type {self.kind!r} is not supported (default, yarn)")
        if self.theta <= 0:
            raise ConfigError("rope_theta must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "deepseek_v3" | "deepseek_v2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    # mla
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool
    rope: RopeConfig
    rope_interleave: bool
    # moe
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str  # "sigmoid" | "softmax"
    norm_topk_prob: bool
    routed_scaling_factor: float
    mlp_bias: bool = False
    # tokens
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    # quantisation: the (rows, cols) block of FP8 weight scales; None when nothing is quantised
    fp8_weight_block: tuple[int, int] | None = None
    # multi-token prediction: layers after the last decoder layer (V3: 1, layer 61), used as
    # the speculative draft (services/model/mtp.py); 0 when the checkpoint has none
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim must be even")
        if self.n_routed_experts:
            if self.topk_method not in TOPK_METHODS:
                raise ConfigError(f"topk_method {self.topk_method!r} not in {TOPK_METHODS}")
            if self.n_routed_experts % self.n_group:
                raise ConfigError("n_routed_experts must be divisible by n_group")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError("topk_group must be in [1, n_group]")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError("num_experts_per_tok must be in [1, n_routed_experts]")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:
                raise ConfigError("noaux_tc needs at least 2 experts per group")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError("num_experts_per_tok exceeds the experts in topk_group groups")

    # mla
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Per token per layer width of the compressed KV cache (normalised c_kv + rotated k_pe)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # moe
    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        return _parse(raw)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return _parse(raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _need(raw: dict[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"config.json: missing field {key!r}")
    value = raw[key]
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config.json: field {key!r} has wrong type bool")
    if not isinstance(value, kind):
        raise ConfigError(f"config.json: field {key!r} has wrong type {type(value).__name__}")
    return value


def _rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in params:
        raise ConfigError("config.json: yarn rope needs field 'factor'")
    original = params.get("original_max_position_embeddings") or raw.get(
        "original_max_position_embeddings"
    )
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params["factor"]),
        original_max_position_embeddings=int(original or raw["max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _fp8_weight_block(quant: Any) -> tuple[int, int] | None:
    """DeepSeek's FP8 scheme: e4m3 weights, one scale per block, activations left alone.

    Activations are never quantised here (weights are dequantised at load), so only the
    "dynamic" scheme, which stores no activation scales, describes a checkpoint we read fully.
    """
    if quant is None:
        return None
    field_name = "config.json: quantization_config"
    if not isinstance(quant, dict):
        raise ConfigError(f"{field_name} must be an object")
    if quant.get("quant_method") != "fp8":
        raise ConfigError(f"{field_name}.quant_method {quant.get('quant_method')!r} is not "
                          "supported (fp8)")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{field_name}.fmt {quant['fmt']!r} is not supported (e4m3)")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{field_name}.activation_scheme {quant['activation_scheme']!r} is "
                          "not supported (dynamic)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{field_name}.weight_block_size must be two positive integers, "
                          f"got {block!r}")
    return block[0], block[1]


def _parse(raw: dict[str, Any]) -> ModelConfig:
    arch = (raw.get("architectures") or [None])[0]
    model_type = raw.get("model_type") or ARCHITECTURES.get(arch or "")
    if model_type not in ("deepseek_v3", "deepseek_v2"):
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not a DeepSeek-V2/V3 model"
        )
    v3 = model_type == "deepseek_v3"
    n_routed = raw.get("n_routed_experts") or 0
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    default_method = "noaux_tc" if v3 else "greedy"
    return ModelConfig(
        model_type=model_type,
        vocab_size=_need(raw, "vocab_size"),
        hidden_size=_need(raw, "hidden_size"),
        intermediate_size=_need(raw, "intermediate_size"),
        num_hidden_layers=_need(raw, "num_hidden_layers"),
        num_attention_heads=_need(raw, "num_attention_heads"),
        max_position_embeddings=_need(raw, "max_position_embeddings"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=_need(raw, "kv_lora_rank"),
        qk_nope_head_dim=_need(raw, "qk_nope_head_dim"),
        qk_rope_head_dim=_need(raw, "qk_rope_head_dim"),
        v_head_dim=_need(raw, "v_head_dim"),
        attention_bias=bool(raw.get("attention_bias", False)),
        rope=_rope(raw),
        # V2 always rotates interleaved pairs; V3 says so in its config (default True).
        rope_interleave=bool(raw.get("rope_interleave", True)) if v3 else True,
        n_routed_experts=int(n_routed),
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
        moe_layer_freq=int(raw.get("moe_layer_freq", 1)),
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        topk_method=raw.get("topk_method") or default_method,
        scoring_func=raw.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
        # transformers' DeepseekV2 never normalises top-k weights; we follow it (documented).
        norm_topk_prob=bool(raw.get("norm_topk_prob", v3)) if v3 else False,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        fp8_weight_block=_fp8_weight_block(raw.get("quantization_config")),
        num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
    )
