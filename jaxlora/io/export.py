"""Exports people load elsewhere: PEFT adapter directories and merged HF checkpoints.

Every output directory is written atomically (temp dir + rename): a crash or a full disk leaves
either the previous output or nothing, never a half-written directory. The chat template used in
training travels with the adapter/model (`chat_template.jinja` and the tokenizer config), so
inference renders prompts exactly like training did. What to export from a run directory (final
adapter, latest checkpoint, full fine-tuning params) is decided in `jaxlora.train.outputs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.io.atomic import atomic_dir
from jaxlora.io.hf import save_params_hf
from jaxlora.io.peft import check_adapter_fits, write_peft_files
from jaxlora.peft.lora import Adapter, merge

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
    adapter: Adapter,
    out_dir: str | Path,
    *,
    base_model: str | None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """PEFT adapter dir (+ tokenizer and chat template when given)."""
    extra = {TEMPLATE_FILE: chat_template} if chat_template else None
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_peft_files(adapter, tmp, base_model=base_model, extra_files=extra)
        _save_tokenizer(tokenizer, tmp, chat_template)  # inside: a full disk leaves nothing
    return Path(out_dir)


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
) -> Path:
    """A full HF checkpoint: base (re-read from disk, never the quantised copy) + adapter,
    or `params` as given (full fine-tuning)."""
    from jaxlora.io.model import load_model

    base_dir = Path(base_dir)
    raw = json.loads((base_dir / "config.json").read_text())
    out_dtype = dtype or raw.get("dtype") or raw.get("torch_dtype") or "float32"
    np_dtype = {"bfloat16": jax.numpy.bfloat16, "float32": np.float32, "float16": np.float16}[
        out_dtype
    ]
    if params is None:
        model = load_model(base_dir, dtype="float32")
        params = model.params
        if adapter is not None:
            check_adapter_fits(adapter, params, "adapter")
            params = merge(params, adapter)
        cfg = model.config
    else:
        from jaxlora.models.config import config_from_hf

        cfg = config_from_hf(raw)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_params_hf(params, cfg, tmp, dtype=np_dtype)
        raw_out = {**raw, "torch_dtype": out_dtype, "dtype": out_dtype}
        (tmp / "config.json").write_text(json.dumps(raw_out, indent=2))
        gen = base_dir / "generation_config.json"
        if gen.is_file():
            (tmp / gen.name).write_text(gen.read_text())
        _save_tokenizer(tokenizer, tmp, chat_template)
    return Path(out_dir)
