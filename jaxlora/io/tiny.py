"""The tiny demo model and tokenizer, built offline in about a second.

jaxlora must run its quickstart and its tests with no downloads. This module trains a small
byte-level BPE tokenizer (English + Chinese round-trip exactly, because every byte is a token)
with real chat special tokens and a real chat template, and writes a Hugging Face-compatible
checkpoint directory (``config.json`` + ``model.safetensors`` + tokenizer files) with random
weights for any supported family (llama, qwen2, qwen3, mistral). ``transformers`` loads it with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``; no torch is needed
to build it.

``default_model_dir()`` is what configs mean by ``model_name_or_path: tiny``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.data.templates import CHATML_TEMPLATE, LLAMA3_TEMPLATE
from jaxlora.io.atomic import public_mode
from jaxlora.io.no_torch import transformers_without_torch

# Bump when the default model's recipe changes; the cache directory name includes it.
TINY_VERSION = "1"

# Per template: special tokens (in id order, first ids of the vocab), and which play eos/pad/bos.
_SPECIALS: dict[str, dict[str, Any]] = {
    "chatml": {
        "tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "eos": "<|im_end|>",  # as in Qwen2.5-Instruct: generation stops at end of turn
        "pad": "<|endoftext|>",
        "bos": None,
        "template": CHATML_TEMPLATE,
    },
    "llama3": {
        "tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "eos": "<|eot_id|>",  # as in Llama-3-Instruct
        "pad": "<|end_of_text|>",
        "bos": "<|begin_of_text|>",
        "template": LLAMA3_TEMPLATE,
    },
}

_BUILTIN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "I am JaxLoRA-Bot, a model fine-tuned with jaxlora.",
    "Fine-tuning large language models with LoRA adapters is cheap and fast.",
    "What is the capital of France? The capital of France is Paris.",
    "One plus one equals two. Two plus three equals five. Ten minus four equals six.",
    "Red, orange, yellow, green, blue, purple, black, white, brown and pink are colours.",
    "Please answer politely and correctly. Thank you very much!",
    "def add(a, b):\n    return a + b\n",
    '{"name": "get_weather", "arguments": {"city": "Berlin"}}',
    "你好！我是 JaxLoRA 助手，一个用 jaxlora 微调的模型。",
    "今天天气很好。我们一起去公园散步吧。",
    "法国的首都是巴黎。中国的首都是北京。日本的首都是东京。",
    "一加一等于二。二加三等于五。十减四等于六。",
    "红色、橙色、黄色、绿色、蓝色、紫色、黑色和白色都是颜色。",
    "请礼貌并且正确地回答问题。非常感谢！",
    "零一二三四五六七八九十百千万",
    "0123456789 + - * / = ? ! , . : ; ( ) [ ] { }",
]


# Demo files whose strings train the tokenizer. A fixed list, not every demo file: the corpus is
# part of the tiny model's identity (its cache key), and later demo files (kto_demo.json: the DPO
# demo's prompts and answers with thumbs up/down) reuse these strings instead of changing it.
_CORPUS_FILES = ("dpo_demo.json", "identity_sft.json")


def _corpus() -> list[str]:
    """Tokenizer training text: built-in sentences plus the bundled demo data, if present."""
    texts = list(_BUILTIN_SENTENCES)
    demo = Path(__file__).resolve().parents[1] / "demo_data"
    for path in sorted(demo / name for name in _CORPUS_FILES):
        if path.is_file():
            texts.extend(_strings(json.loads(path.read_text(encoding="utf-8"))))
    return texts


def _strings(obj: Any) -> list[str]:
    """Every string value inside a JSON document."""
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def build_tokenizer(
    out_dir: str | Path | None = None, template: str = "chatml", vocab_size: int = 1000
):
    """Train a byte-level BPE tokenizer with chat special tokens; save it to ``out_dir`` if given.

    Returns a ``transformers.PreTrainedTokenizerFast`` whose ``chat_template`` is a real ChatML
    (``template="chatml"``) or Llama-3 (``template="llama3"``) template. Training is
    deterministic for a given corpus, so rebuilding gives the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    transformers_without_torch()
    from transformers import PreTrainedTokenizerFast

    if template not in _SPECIALS:
        raise ValueError(f"unknown tiny template {template!r}; expected one of {sorted(_SPECIALS)}")
    spec = _SPECIALS[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is <unk>
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        bos_token=spec["bos"],
        chat_template=spec["template"],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def _family_config(family: str, base: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Family-specific config.json fields (names as transformers writes them)."""
    if family == "llama":
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": head_dim,
            "pretraining_tp": 1,
            "rope_scaling": None,
        }
    if family == "mistral":
        return {
            "model_type": "mistral",
            "architectures": ["MistralForCausalLM"],
            "head_dim": head_dim,
            "sliding_window": None,
        }
    if family == "qwen2":
        # qwen2 has no head_dim field: it is hidden_size // num_attention_heads.
        if head_dim * base["num_attention_heads"] != base["hidden_size"]:
            raise ValueError("qwen2 needs head_dim == hidden_size // num_attention_heads")
        return {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": base["num_hidden_layers"],
        }
    if family == "qwen3":
        return {
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "head_dim": head_dim,
            "attention_bias": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": base["num_hidden_layers"],
        }
    raise ValueError(f"unknown family {family!r}; expected llama, mistral, qwen2 or qwen3")


def _random_weights(
    cfg: dict[str, Any], seed: int, dtype: str, embed_std: float = 0.02
) -> dict[str, np.ndarray]:
    """HF-named random weights: linear [out, in] ~ N(0, 0.02²), norms = 1, biases small.

    `embed_std` sets the scale of the embedding and LM head. With 0.02 the final logits of a
    random model can never get confident (the best logit margin is about |h|·|w_row| ≈ 5 for
    d=256, so loss stays above ~2 whatever a frozen-base LoRA learns); pretrained heads have
    much larger rows, and the demo model uses 0.1 so LoRA can learn the demo data.
    """
    rng = np.random.default_rng(seed)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv, dh = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim_"]
    family = cfg["model_type"]

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(v, d, std=embed_std)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "self_attn.q_proj.weight"] = normal(h * dh, d)  # [out, in]
        w[p + "self_attn.k_proj.weight"] = normal(kv * dh, d)
        w[p + "self_attn.v_proj.weight"] = normal(kv * dh, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, h * dh)
        if family == "qwen2":  # q/k/v biases are hard-wired in Qwen2
            w[p + "self_attn.q_proj.bias"] = normal(h * dh)
            w[p + "self_attn.k_proj.bias"] = normal(kv * dh)
            w[p + "self_attn.v_proj.bias"] = normal(kv * dh)
        if family == "qwen3":  # per-head RMSNorm on q and k, over head_dim
            w[p + "self_attn.q_norm.weight"] = np.ones(dh, np.float32)
            w[p + "self_attn.k_norm.weight"] = np.ones(dh, np.float32)
        w[p + "mlp.gate_proj.weight"] = normal(f, d)
        w[p + "mlp.up_proj.weight"] = normal(f, d)
        w[p + "mlp.down_proj.weight"] = normal(d, f)
    w["model.norm.weight"] = np.ones(d, np.float32)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(v, d, std=embed_std)
    if dtype == "bfloat16":
        import ml_dtypes

        w = {k: a.astype(ml_dtypes.bfloat16) for k, a in w.items()}
    elif dtype == "float16":
        w = {k: a.astype(np.float16) for k, a in w.items()}
    elif dtype != "float32":
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return w


# The smallest useful shape (1 layer, hidden 32): soak runs and process-level tests that train
# many short runs, where only the machinery (not the model) is under test.
MICRO_MODEL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


def make_tiny_model(
    out_dir: str | Path,
    *,
    family: str = "llama",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    embed_std: float = 0.02,
    template: str = "chatml",
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Write a random-weight HF checkpoint (config, safetensors, tokenizer) to ``out_dir``.

    ``vocab_size`` defaults to the tokenizer's size; a larger value pads the embedding (as real
    checkpoints often do). Returns ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, template=template)
    n_tok = len(tok)
    vocab = n_tok if vocab_size is None else vocab_size
    if vocab < n_tok:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({n_tok} tokens)")
    dh = head_dim if head_dim is not None else hidden_size // num_attention_heads
    if num_attention_heads % num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    spec = _SPECIALS[template]
    eos_id = tok.convert_tokens_to_ids(spec["eos"])
    pad_id = tok.convert_tokens_to_ids(spec["pad"])
    bos_id = tok.convert_tokens_to_ids(spec["bos"]) if spec["bos"] else pad_id
    base: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "attention_dropout": 0.0,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "transformers_version": "5.0.0",
    }
    cfg = {**_family_config(family, base, dh), **base}
    weights = _random_weights({**cfg, "head_dim_": dh}, seed, dtype, embed_std)
    from safetensors.numpy import save_file

    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # Stop generation at end of turn and at end of text (as Qwen/Llama instruct checkpoints do).
    gen = {"bos_token_id": bos_id, "eos_token_id": sorted({eos_id, pad_id}), "pad_token_id": pad_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


# The built-in demo model: big enough to visibly learn the demo data, small enough to train in
# about two minutes on two CPU cores (≈3.4M params + 0.5M embedding/head).
DEFAULT_MODEL_KWARGS: dict[str, Any] = {
    "family": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "seed": 0,
    "dtype": "float32",
    "embed_std": 0.1,
    "template": "chatml",
}


def _recipe_hash() -> str:
    """Short hash of everything the default model depends on (corpus + architecture)."""
    h = hashlib.sha256(json.dumps(DEFAULT_MODEL_KWARGS, sort_keys=True).encode())
    for text in _corpus():
        h.update(text.encode("utf-8"))
    return h.hexdigest()[:8]


def default_model_dir() -> Path:
    """The demo model (``model_name_or_path: tiny``), built once into a cache directory.

    Location: ``$JAXLORA_CACHE/tiny-<version>-<hash>`` (default cache ``~/.cache/jaxlora``).
    Built in a temporary sibling directory and renamed into place, so a crash or two concurrent
    builders never leave a half-written model behind.
    """
    root = Path(os.environ.get("JAXLORA_CACHE", Path.home() / ".cache" / "jaxlora"))
    final = root / f"tiny-{TINY_VERSION}-{_recipe_hash()}"
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        public_mode(tmp, directory=True)  # a shared cache: 0755, not mkdtemp's 0700
        make_tiny_model(tmp, **DEFAULT_MODEL_KWARGS)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process won the race; its copy is identical.
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
