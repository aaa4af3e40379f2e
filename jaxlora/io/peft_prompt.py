"""PEFT-format prompt-tuning and prefix-tuning adapters: save, load, check against a model.

Why this file exists: PEFT stores both methods as ONE tensor, `prompt_embeddings`, in
`adapter_model.safetensors`, with `peft_type` PROMPT_TUNING ([n, hidden]) or PREFIX_TUNING
([n, layers·2·token_dim], token_dim = kv_heads·head_dim for grouped-query attention, PEFT #1901).
`PeftModel.from_pretrained` loads what we write and gives the same logits, and PEFT-made adapters
load here (and can be trained further).

Prefix tuning with reparameterisation is saved as its MLP's OUTPUT, and the config says
`prefix_projection: false`: a plain prefix adapter, which PEFT loads for inference and for
further training alike (PEFT's own `prefix_projection: true` files load here too; their tensor
is that same output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.atomic import atomic_dir
from jaxlora.models import prompt as vt
from jaxlora.models.config import ModelConfig
from jaxlora.peft.prompt import PromptAdapter, PromptConfig, peft_embeddings

PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "PREFIX_TUNING": "prefix_tuning"}
KEY = "prompt_embeddings"


def prompt_peft_config(
    adapter: PromptAdapter, model_config: ModelConfig, base_model: str | None = None
) -> dict[str, Any]:
    c = adapter.config
    common = {
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "num_virtual_tokens": c.num_virtual_tokens,
        "num_layers": model_config.num_hidden_layers,
        "num_transformer_submodules": 1,
        "modules_to_save": None,
        "revision": None,
        "auto_mapping": None,
    }
    if c.method == "prompt_tuning":
        return {
            **common,
            "peft_type": "PROMPT_TUNING",
            "token_dim": model_config.hidden_size,
            "num_attention_heads": model_config.num_attention_heads,
            # The trained values are in the file; the init only mattered before training.
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }
    return {
        **common,
        "peft_type": "PREFIX_TUNING",
        "token_dim": model_config.num_key_value_heads * model_config.head_dim,
        "num_attention_heads": model_config.num_key_value_heads,
        "encoder_hidden_size": c.encoder_hidden_size or model_config.hidden_size,
        "prefix_projection": False,
        "init_weights": None,
    }


def save_prompt_adapter(
    adapter: PromptAdapter, model_config: ModelConfig, path: str | Path, base_model: str | None
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` atomically."""
    with atomic_dir(path) as tmp:
        write_prompt_files(adapter, model_config, tmp, base_model)
    return Path(path)


def write_prompt_files(
    adapter: PromptAdapter, model_config: ModelConfig, out: Path, base_model: str | None
) -> None:
    """`adapter_config.json` + `adapter_model.safetensors` into an existing directory."""
    from safetensors.numpy import save_file

    (out / "adapter_config.json").write_text(
        json.dumps(prompt_peft_config(adapter, model_config, base_model), indent=2)
    )
    emb = np.ascontiguousarray(peft_embeddings(adapter))
    save_file({KEY: emb}, str(out / "adapter_model.safetensors"))


def is_prompt_adapter(raw: dict) -> bool:
    return raw.get("peft_type") in PEFT_TYPES


def load_prompt_adapter(d: Path, raw: dict) -> PromptAdapter:
    """A PEFT PROMPT_TUNING / PREFIX_TUNING directory (config already read) → PromptAdapter."""
    from safetensors import safe_open

    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{d}: adapter_model.safetensors not found")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{d}/adapter_config.json: task_type {raw['task_type']!r} (need CAUSAL_LM)")
    if int(raw.get("num_transformer_submodules") or 1) != 1:
        raise UserError(f"{d}/adapter_config.json: num_transformer_submodules must be 1")
    with safe_open(str(weights), framework="numpy") as f:
        keys = list(f.keys())
        if keys != [KEY]:
            raise UserError(f"{weights}: expected one tensor {KEY!r}, found {keys}")
        emb = np.asarray(f.get_tensor(KEY), np.float32)
    method = PEFT_TYPES[raw["peft_type"]]
    n = int(raw.get("num_virtual_tokens") or emb.shape[0])
    if emb.ndim != 2 or emb.shape[0] != n:
        raise UserError(f"{weights}: {KEY} has shape {list(emb.shape)}, expected [{n}, ...]")
    config = PromptConfig(method=method, num_virtual_tokens=n)
    leaf = vt.PROMPT_KEY if method == "prompt_tuning" else vt.PREFIX_KEY
    return PromptAdapter({leaf: emb}, config)


def check_prompt_fits(adapter: PromptAdapter, cfg: ModelConfig, source: str = "adapter") -> None:
    """UserError naming both shapes when the virtual tokens do not fit this model."""
    tree = adapter.params
    if adapter.config.method == "prompt_tuning":
        want, got = cfg.hidden_size, tree[vt.PROMPT_KEY].shape[-1]
        what = "hidden size"
    else:
        if vt.MLP_KEY in tree:
            got = tree[vt.MLP_KEY]["w2"].shape[-1]
        else:
            got = tree[vt.PREFIX_KEY].shape[-1]
        want, what = vt.prefix_width(cfg), "layers x 2 x kv_heads x head_dim"
    if got != want:
        raise UserError(
            f"{source}: {adapter.config.method} vectors have width {got} but this model needs "
            f"{want} ({what}); was it trained on a different base model?"
        )
