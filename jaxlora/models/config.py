"""Architecture description of a Llama-family decoder, parsed from a Hugging Face `config.json`.

One frozen dataclass covers Llama 2/3/3.1+, Qwen2/2.5, Qwen3, Mistral and Gemma 2/3 (text); the
differences between them are flags (biases, q/k norms, sliding window, rope scaling, and for
Gemma the (1 + w) norms, sandwich norms, GeGLU, soft-caps and per-layer sliding/global layers).
Qwen3-MoE and Mixtral add the mixture-of-experts fields (`num_experts` > 0; parsed in
`jaxlora.models.moe`).
Both spellings of the HF config are accepted: transformers <5 (`rope_theta`, `rope_scaling`,
`torch_dtype`) and transformers 5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxlora.errors import UserError
from jaxlora.models.moe import MOE_MODEL_TYPES, moe_fields

GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "mixtral",
) + GEMMA_MODEL_TYPES
SLIDING, FULL = "sliding_attention", "full_attention"
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2; Llama `attention_bias`)
    o_bias: bool = False  # o_proj carries a bias (Llama `attention_bias` only)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Mixture of experts (Qwen3-MoE, Mixtral; see jaxlora.models.moe). 0 experts = dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # one expert's SwiGLU width
    norm_topk_prob: bool = False  # renormalise the top-k router weights (Mixtral: always)
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False  # HF: add coef * load-balancing loss to the LM loss
    router_jitter_noise: float = 0.0  # Mixtral: multiplicative noise on the MoE input (train)
    # Gemma 2/3 (all off for the other families):
    hidden_act: str = "silu"  # "gelu_pytorch_tanh": GeGLU with the tanh-approximate GELU
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in fp32 before the cast back
    sandwich_norms: bool = False  # norms after attention and around the MLP (4 per layer)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim)
    attn_logit_softcap: float | None = None  # scores = c * tanh(scores / c) before the mask
    final_logit_softcap: float | None = None  # logits = c * tanh(logits / c)
    # Per-layer "sliding_attention" / "full_attention": only sliding layers use `sliding_window`
    # (None: every layer uses `sliding_window`, as Mistral).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (Gemma 3), unscaled
    weight_prefix: str = "model."  # HF tensor prefix of the decoder ("model.language_model.")

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        r = self.rope
        return r.get("rope_type", r.get("type", "default"))

    def num_params(self) -> int:
        """Total parameter count (embedding included; tied head counted once)."""
        d, f, v, nl = (
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.num_hidden_layers,
        )
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        attn += d if self.o_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        if self.num_experts:  # router + E experts
            mlp = d * self.num_experts + self.num_experts * 3 * d * self.moe_intermediate_size
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + nl * per_layer + d + head


def _rope_from_hf(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (theta, scaling dict or None) from either config spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UserError("per-layer-type rope_parameters (Gemma-style) are not supported")
    scaling = dict(params) if isinstance(params, dict) else None
    if scaling is None and isinstance(raw.get("rope_scaling"), dict):
        scaling = dict(raw["rope_scaling"])
    theta = raw.get("rope_theta")
    if theta is None and scaling is not None:
        theta = scaling.get("rope_theta")
    theta = float(theta if theta is not None else 10000.0)
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(
                f"rope_type {rope_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if rope_type == "default":
            scaling = None
    return theta, scaling


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from the dict in an HF `config.json`."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{source}: model_type {model_type!r} is not supported; supported model types: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    if model_type in GEMMA_MODEL_TYPES:
        return _gemma_from_hf(raw, source)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{source}: hidden_act {act!r} is not supported (only silu / SwiGLU)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in raw:
            raise UserError(f"{source}: missing required field {key!r}")
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    theta, scaling = _rope_from_hf(raw)
    attention_bias = bool(raw.get("attention_bias", False))
    qkv_bias = True if model_type == "qwen2" else attention_bias and model_type != "mixtral"
    o_bias = attention_bias if model_type in ("llama", "qwen3_moe") else False
    sliding = None
    if model_type in ("mistral", "mixtral"):
        sliding = raw.get("sliding_window")
    elif model_type == "qwen3_moe" and raw.get("use_sliding_window"):
        sliding = raw.get("sliding_window")  # every layer (Qwen3MoeAttention)
    elif model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        # Qwen applies the window only to layers >= max_window_layers; with that many layers
        # or more it is a no-op. Anything else would need per-layer masks.
        if raw.get("max_window_layers", 0) < raw["num_hidden_layers"]:
            raise UserError(f"{source}: Qwen per-layer sliding window is not supported")
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos)
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    moe = moe_fields(raw, source) if model_type in MOE_MODEL_TYPES else {}
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=str(dtype),
        **moe,
    )


def _gemma_rope(params: Any, source: str) -> tuple[float, tuple | None]:
    """(theta, scaling) of one Gemma layer type; only default and linear RoPE occur."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise UserError(f"{source}: Gemma rope_type {rope_type!r} is not supported")
    return theta, (tuple(sorted(params.items())) if rope_type == "linear" else None)


def _gemma_from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    """Gemma 2, Gemma 3 text, and the text part of a Gemma 3 (`text_config`) checkpoint."""
    model_type = raw["model_type"]
    text = raw
    if model_type == "gemma3":
        if not isinstance(raw.get("text_config"), dict):
            raise UserError(f"{source}: a gemma3 config needs its `text_config`")
        text = {**raw["text_config"], "tie_word_embeddings": raw.get("tie_word_embeddings", True)}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        if key not in text:
            raise UserError(f"{source}: missing required field {key!r}")
    act = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UserError(f"{source}: hidden_activation {act!r} is not supported for Gemma")
    if text.get("use_bidirectional_attention"):  # EmbeddingGemma: an encoder, not a causal LM
        raise UserError(
            f"{source}: use_bidirectional_attention (non-causal Gemma) is not supported"
        )
    n = int(text["num_hidden_layers"])
    types = text.get("layer_types")
    if types is None and model_type == "gemma2":  # pre-transformers-5 configs: even = sliding
        types = [SLIDING if i % 2 == 0 else FULL for i in range(n)]
    elif types is None:  # Gemma 3 before layer_types: every `pattern`-th layer is global
        pattern = int(text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6)))
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise UserError(f"{source}: layer_types must list {SLIDING!r}/{FULL!r} for {n} layers")
    rope = text.get("rope_parameters")
    local_theta = None
    if isinstance(rope, dict) and FULL in rope:  # transformers 5, per layer type (Gemma 3)
        theta, scaling = _gemma_rope(rope[FULL], source)
        local_theta, local_scaling = _gemma_rope(rope.get(SLIDING), source)
        if local_scaling is not None:
            raise UserError(f"{source}: RoPE scaling on the sliding layers is not supported")
    else:
        if isinstance(rope, dict):
            params = dict(rope)
        else:
            params = {**(text.get("rope_scaling") or {}), "rope_theta": text.get("rope_theta")}
            params["rope_theta"] = params["rope_theta"] or 10000.0
        theta, scaling = _gemma_rope(params, source)
        if model_type != "gemma2":
            local_theta = float(text.get("rope_local_base_freq", 10000.0))
    heads = int(text["num_attention_heads"])
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or text.get("dtype") or "float32"

    def opt(key):
        return float(text[key]) if text.get(key) is not None else None

    return ModelConfig(
        model_type=model_type,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or text["hidden_size"] // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(text.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", True)),
        qkv_bias=bool(text.get("attention_bias", False)),
        o_bias=bool(text.get("attention_bias", False)),
        qk_norm=model_type != "gemma2",
        sliding_window=int(text["sliding_window"]) if text.get("sliding_window") else None,
        bos_token_id=text.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=text.get("pad_token_id"),
        torch_dtype=str(dtype),
        hidden_act="gelu_pytorch_tanh",
        norm_plus_one=True,
        sandwich_norms=True,
        embed_scale=True,
        query_pre_attn_scalar=opt("query_pre_attn_scalar"),
        attn_logit_softcap=opt("attn_logit_softcapping"),
        final_logit_softcap=opt("final_logit_softcapping"),
        layer_types=tuple(types),
        rope_local_theta=local_theta,
        weight_prefix="model.language_model." if model_type == "gemma3" else "model.",
    )


def load_hf_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read `<model_dir>/config.json`; returns the parsed config and the raw dict."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UserError(f"model directory {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise UserError(
            f"{model_dir}: no config.json found — expected a Hugging Face model directory "
            "(config.json + *.safetensors + tokenizer files)"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return config_from_hf(raw, str(path)), raw
