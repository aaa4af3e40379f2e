"""GGUF out: a merged model as one `.gguf` file llama.cpp / Ollama run, plus an Ollama Modelfile.

Written with the `gguf` package's `GGUFWriter` and `gguf.quants` (llama.cpp's own Python side),
following llama.cpp's `convert_hf_to_gguf.py` conventions: tensor names from the package's
mapping table, q/k projection rows permuted for llama.cpp's pairwise rope (llama architecture
only; Qwen's rope already matches), 1-D tensors (norms, biases) kept in F32, 2-D weights in the
requested type (Q8_0 falls back to F16 for rows not a multiple of its 32-value block).

The tokenizer: a base converted from a GGUF (`jaxlora.io.gguf`) gets back its original
`tokenizer.*` metadata verbatim; an HF base's byte-level BPE tokenizer is described from its
`tokenizer.json` (vocabulary, merges, token types, and the llama.cpp pre-tokenizer name matching
its split rule). The chat template is the one training used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.gguf import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    SOURCE_FILE,
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    gguf_name,
    permute_qk,
)
from jaxlora.models.config import ModelConfig

GGUF_TYPES = ("f16", "bf16", "q8_0")
EXPORT_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_FILE = "model.gguf"


def _pre_name(spec: dict) -> str:
    """llama.cpp pre-tokenizer name for a tokenizer.json pre_tokenizer (inverse of the reader)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        named = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
        if regex in named:
            return named[regex]
    raise UserError(
        f"GGUF export: the tokenizer's pre-tokenizer ({kinds}) matches none llama.cpp knows "
        "by name here (gpt2, smollm, llama-bpe, qwen2)"
    )


def _hf_tokenizer_fields(tokenizer: Any) -> dict[str, Any]:
    """`tokenizer.*` GGUF metadata for a byte-level BPE transformers tokenizer."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style); "
            f"this one is {model.get('type')} with a {(spec.get('decoder') or {}).get('type')} "
            "decoder"
        )
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [1] * size  # NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(spec),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
    }
    for name, gname in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            fields[f"tokenizer.ggml.{gname}_token_id"] = int(tid)
    return fields


def tokenizer_fields(base_dir: Path, tokenizer: Any, chat_template: str | None) -> dict[str, Any]:
    source = base_dir / SOURCE_FILE
    if source.is_file():  # the base came from a GGUF: its tokenizer metadata, verbatim
        meta = json.loads(source.read_text())["metadata"]
        fields = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    elif tokenizer is not None:
        fields = _hf_tokenizer_fields(tokenizer)
    else:
        raise UserError(f"{base_dir}: no tokenizer to write into the GGUF file")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        fields["tokenizer.chat_template"] = template
    return fields


def _add_field(writer, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        writer.add_array(key, value)


def _add_model_fields(writer, cfg: ModelConfig, name: str, qtype: str) -> None:
    import gguf

    scaling = dict(cfg.rope_scaling or ())
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in (None, "default", "linear"):
        raise UserError(
            f"GGUF export does not write rope_type {rope_type!r} (llama.cpp needs it baked into "
            "extra tensors); export the merged HF model (--merged) and convert it with llama.cpp"
        )
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    # Always written: readers differ in the default (llama.cpp: hidden / heads; transformers'
    # GGUF loader: 128 for Qwen3).
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_vocab_size(cfg.vocab_size)
    ftype = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[qtype]
    writer.add_file_type(int(gguf.LlamaFileType[ftype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) for one tensor in HF layout."""
    import gguf

    if w.ndim == 1:  # norms and biases stay F32, as llama.cpp's converter keeps them
        return w.astype(np.float32), None
    if qtype == "f16" or (qtype == "q8_0" and w.shape[-1] % 32):
        return w.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if qtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(w.astype(np.float32), kind), kind


def write_gguf(
    path: str | Path,
    tensors: Any,
    cfg: ModelConfig,
    *,
    base_dir: Path,
    tokenizer: Any,
    chat_template: str | None,
    qtype: str = "f16",
    name: str = "jaxlora export",
) -> Path:
    """One GGUF file from a (merged) params pytree, or from an iterable of (HF name, array in HF
    layout) pairs consumed one at a time: gguf-py's `use_temp_file` spools each encoded tensor to
    a temporary file as it is added (memory up to 256 MiB, then disk), so only one tensor is in
    memory at once; the file is assembled when all are in."""
    import gguf

    from jaxlora.io.hf import params_to_hf_tensors

    if isinstance(tensors, dict):  # a params pytree
        tensors = params_to_hf_tensors(tensors, cfg, np.float32)

    if qtype not in GGUF_TYPES:
        raise UserError(f"--gguf-type {qtype!r}: use one of {', '.join(GGUF_TYPES)}")
    if cfg.model_type not in EXPORT_ARCH:
        raise UserError(f"GGUF export supports {', '.join(EXPORT_ARCH)}, not {cfg.model_type}")
    arch = EXPORT_ARCH[cfg.model_type]
    fields = tokenizer_fields(base_dir, tokenizer, chat_template)
    writer = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    _add_model_fields(writer, cfg, name, qtype)
    for key, value in fields.items():
        _add_field(writer, key, value)
    for hf_name, w in tensors:
        if arch == "llama" and ".self_attn.q_proj." in hf_name:
            w = permute_qk(w, cfg.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in hf_name:
            w = permute_qk(w, cfg.num_key_value_heads)
        data, raw = _encode(w, qtype)
        writer.add_tensor(gguf_name(hf_name, arch, cfg.num_hidden_layers), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _roles(template: str, bos: str, eos: str) -> dict[str, Any]:
    """Per-role text around a message, the generation prompt and any default system prompt,
    read off the chat template by rendering marker messages (Jinja -> Ollama's Go template)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(template)

    def render(msgs, gen=False):
        return tmpl.render(messages=msgs, add_generation_prompt=gen, bos_token=bos, eos_token=eos)

    s, u, a = ("system", "@@SYS@@"), ("user", "@@USER@@"), ("assistant", "@@ASSISTANT@@")
    conv = [{"role": r, "content": c} for r, c in (s, u, a)]
    full = render(conv)
    out: dict[str, Any] = {}
    prev = 0
    for role, marker in (s, u, a):
        i = full.index(marker)
        out[f"{role}_pre"] = full[prev:i]
        prev = i + len(marker)
    # Each prefix so far also holds the previous message's suffix: split them at the point the
    # assistant's own suffix (what follows its content) says a message ends.
    asst_suf = full[prev:]
    out["assistant_suf"] = asst_suf
    for role in ("user", "assistant"):
        pre = out[f"{role}_pre"]
        if asst_suf and pre.startswith(asst_suf):
            out[f"{role}_pre"] = pre[len(asst_suf) :]
    out["system_suf"] = out["user_suf"] = asst_suf
    one = [conv[1]]
    gen = render(one, gen=True)[len(render(one)) :]
    out["generation"] = gen
    head = render(one).split("@@USER@@")[0]
    default_system = None
    if head.startswith(out["system_pre"]) and head.endswith(asst_suf + out["user_pre"]):
        default_system = head[len(out["system_pre"]) : len(head) - len(asst_suf + out["user_pre"])]
    out["default_system"] = default_system or None
    return out


def ollama_modelfile(template: str, bos: str, eos: str, gguf_file: str = GGUF_FILE) -> str:
    """An Ollama Modelfile: FROM the GGUF, TEMPLATE in Go syntax, stop tokens, default system.

    A template whose per-role text cannot be read off by rendering marker messages (one that
    rewrites or drops message contents) gets no TEMPLATE line: Ollama then falls back to the
    chat template stored in the GGUF file itself.
    """
    import jinja2

    try:
        r = _roles(template, bos or "", eos or "")
    except (ValueError, jinja2.TemplateError):
        stop = [f"PARAMETER stop {json.dumps(eos)}"] if eos else []
        return "\n".join([f"FROM ./{gguf_file}", *stop]) + "\n"

    def wrap(role: str, content: str) -> str:
        return f"{r[f'{role}_pre']}{{{{ {content} }}}}{r[f'{role}_suf']}"

    # No `{{-` trimming: the template's own newlines (e.g. after <|im_end|>) must survive.
    go = (
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{wrap("system", ".Content")}'
        f'{{{{ else if eq .Role "user" }}}}{wrap("user", ".Content")}'
        f'{{{{ else if eq .Role "assistant" }}}}{wrap("assistant", ".Content")}'
        "{{ end }}{{ end }}"
        f"{r['generation']}"
    )
    stops = []
    for s in (r["assistant_suf"].strip(), eos):
        if s and s not in stops:
            stops.append(s)
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{go}"""']
    if r["default_system"]:
        lines.append(f'SYSTEM """{r["default_system"]}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"
