"""Exports people load elsewhere: PEFT adapter directories, merged HF checkpoints, merged GGUF.

Every output directory is written atomically (temp dir + rename): a crash or a full disk leaves
either the previous output or nothing, never a half-written directory. The chat template used in
training travels with the adapter/model (`chat_template.jinja` and the tokenizer config), so
inference renders prompts exactly like training did. What to export from a run directory (final
adapter, latest checkpoint, full fine-tuning params) is decided in `jaxlora.train.outputs`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.atomic import atomic_dir
from jaxlora.io.bottleneck import write_bottleneck_files
from jaxlora.io.hf import abstract_params
from jaxlora.io.peft import check_adapter_fits, write_peft_files
from jaxlora.io.peft_prompt import write_prompt_files
from jaxlora.models.moe import MOE_MODEL_TYPES
from jaxlora.peft.bottleneck import BottleneckAdapter
from jaxlora.peft.lora import Adapter
from jaxlora.peft.prompt import PromptAdapter

TEMPLATE_FILE = "chat_template.jinja"


def _save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    if tokenizer is None:
        return
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out))
    if chat_template:
        (out / TEMPLATE_FILE).write_text(chat_template)


def export_adapter(
    adapter: Adapter | PromptAdapter,
    out_dir: str | Path,
    *,
    base_model: str | None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    overwrite: bool = False,
    model_config: Any = None,
) -> Path:
    """PEFT adapter dir (+ tokenizer and chat template when given). A `PromptAdapter` (prompt /
    prefix tuning) needs the base's `model_config` (PEFT's config records its shapes)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        if isinstance(adapter, BottleneckAdapter):
            write_bottleneck_files(adapter, model_config, tmp, base_model)
            if chat_template:
                (tmp / TEMPLATE_FILE).write_text(chat_template)
        elif isinstance(adapter, PromptAdapter):
            write_prompt_files(adapter, model_config, tmp, base_model)
            if chat_template:
                (tmp / TEMPLATE_FILE).write_text(chat_template)
        else:
            extra = {TEMPLATE_FILE: chat_template} if chat_template else None
            write_peft_files(
                adapter, tmp, base_model=base_model, extra_files=extra, model_config=model_config
            )
        _save_tokenizer(tokenizer, tmp, chat_template)  # inside: a full disk leaves nothing
    return Path(out_dir)


def refuse_merge(adapter: Any) -> None:
    """UserError for adapters that change no weight, so no merged checkpoint can hold them."""
    if isinstance(adapter, BottleneckAdapter):
        raise UserError(
            "a bottleneck adapter cannot be merged into the base weights: it adds a non-linear "
            "layer (h + up(act(down(h)))) after attention / the MLP, which no weight of the base "
            "model can express; export the adapter or use it with --adapter"
        )
    if isinstance(adapter, PromptAdapter):
        raise UserError(
            f"a {adapter.config.method} adapter cannot be merged into the base weights: its "
            "virtual tokens are extra keys/values in front of every sequence, not a change to any "
            "weight; export the adapter (PEFT loads it) or use it with --adapter"
        )


def _merged_tensors(base_dir: Path, cfg: Any, adapter: Adapter | None, dtype: Any):
    """(hf_name, array) of base + adapter, merged one tensor at a time on the host in fp32:
    W' = W + s·(A·B)ᵀ in HF's [out, in] layout (DoRA: each output row rescaled to its
    magnitude, the norm taken of the merged row, as PEFT merges). Never the whole model at once,
    never on a device: peak memory is one tensor plus the shard being written."""
    from jaxlora.io.hf import base_hf_tensors
    from jaxlora.peft.lora import iter_modules

    modules = {}
    if adapter is not None:
        for path, node in iter_modules(adapter.params):
            modules[path] = {k: np.asarray(jax.device_get(v), np.float32) for k, v in node.items()}
    s = adapter.config.scale if adapter is not None else 0.0
    for path, layer, name, w in base_hf_tensors(base_dir, cfg):  # w: [out, in], base dtype
        node = modules.get(path[:-1]) if path[-1] == "kernel" else None
        if node is not None:  # adapted: merged in fp32 (others pass through, no fp32 copy)
            a, b = node["lora_a"][layer], node["lora_b"][layer]  # [in, r], [r, out]
            w = w.astype(np.float32) + s * (b.T @ a.T)  # [out, in]
            if "magnitude" in node:
                norm = np.sqrt(np.sum(w * w, axis=1, keepdims=True))  # per output row
                w *= node["magnitude"][layer][:, None] / norm
        yield name, np.ascontiguousarray(w.astype(dtype, copy=False))


def export_merged(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    adapter: Adapter | None = None,
    params: dict | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    write: bool = True,
    max_shard_bytes: int = 4 * 1024**3,
) -> Path:
    """A full HF checkpoint: base (re-read from disk tensor by tensor, never the quantised copy)
    + adapter merged on the host, or `params` as given (full fine-tuning).

    `write=False` (multi-host, processes other than 0): only take part in gathering `params`
    (a collective per layer, see `hf.params_to_hf_tensors`); nothing is written."""
    from jaxlora.io.hf import extra_hf_tensors, params_to_hf_tensors, write_hf_shards
    from jaxlora.models.config import config_from_hf

    base_dir = Path(base_dir)
    raw = json.loads((base_dir / "config.json").read_text())
    out_dtype = dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32"
    np_dtype = {"bfloat16": jax.numpy.bfloat16, "float32": np.float32, "float16": np.float16}[
        out_dtype
    ]
    cfg = config_from_hf(raw)
    if params is None:
        refuse_merge(adapter)  # prompt / bottleneck adapters have no weights to fold in
        if adapter is not None:
            check_adapter_fits(adapter, abstract_params(cfg)[0], "adapter")
        tensors = _merged_tensors(base_dir, cfg, adapter, np_dtype)
    else:
        tensors = params_to_hf_tensors(params, cfg, np_dtype)
    # Gemma 3 multimodal: the vision tower and projector pass through (text-only: nothing).
    tensors = itertools.chain(tensors, extra_hf_tensors(base_dir, cfg) if write else ())
    if not write:
        for _ in tensors:
            pass
        return Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_hf_shards(tensors, tmp, max_shard_bytes)
        raw_out = {**raw, "torch_dtype": out_dtype, "dtype": out_dtype}
        (tmp / "config.json").write_text(json.dumps(raw_out, indent=2))
        gen = base_dir / "generation_config.json"
        if gen.is_file():
            (tmp / gen.name).write_text(gen.read_text())
        _save_tokenizer(tokenizer, tmp, chat_template)
    return Path(out_dir)


def export_gguf(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    adapter: Adapter | None = None,
    params: dict | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> Path:
    """`model.gguf` (merged, llama.cpp / Ollama) + an Ollama `Modelfile`, written atomically.

    Streams like `export_merged`: the base is re-read from disk one tensor at a time and the
    adapter merged on the host (`_merged_tensors`), or `params` (full fine-tuning) gathered one
    layer at a time (`hf.params_to_hf_tensors`); each tensor is encoded and spooled to the file
    as it comes, so no whole model is ever held on a device or on the host."""
    from jaxlora.io.gguf_export import GGUF_FILE, GGUF_TYPES, ollama_modelfile, write_gguf
    from jaxlora.io.hf import params_to_hf_tensors
    from jaxlora.models.config import config_from_hf

    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")
    refuse_merge(adapter)
    base_dir = Path(base_dir)
    raw = json.loads((base_dir / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type in MOE_MODEL_TYPES:
        raise UserError(
            f"GGUF export of mixture-of-experts models ({model_type}) is not supported; use "
            "`jaxlora export RUN --out DIR --merged` and llama.cpp's convert_hf_to_gguf.py"
        )
    cfg = config_from_hf(raw)
    if params is None:
        if adapter is not None:
            check_adapter_fits(adapter, abstract_params(cfg)[0], "adapter")
        tensors = _merged_tensors(base_dir, cfg, adapter, np.float32)
    else:
        tensors = params_to_hf_tensors(params, cfg, np.float32)
    template = chat_template or getattr(tokenizer, "chat_template", None)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_gguf(
            tmp / GGUF_FILE,
            tensors,
            cfg,
            base_dir=base_dir,
            tokenizer=tokenizer,
            chat_template=template,
            qtype=gguf_type,
            name=Path(out_dir).name,
        )
        if template:
            bos = getattr(tokenizer, "bos_token", None) or ""
            eos = getattr(tokenizer, "eos_token", None) or ""
            (tmp / "Modelfile").write_text(ollama_modelfile(template, bos, eos))
    return Path(out_dir)
