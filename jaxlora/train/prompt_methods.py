"""Prompt tuning, prefix tuning and bottleneck adapters as fine-tuning methods: small trainable
collections ("prompt", "adapter") next to a frozen base.

Why this file exists: `jaxlora.train.methods` splits a model for LoRA / full / freeze; these two
methods train only n virtual tokens (`jaxlora.peft.prompt`, used by the decoder as per-layer
key/value prefixes, `jaxlora.models.prompt`) next to a frozen (maybe quantised) base, and they
continue from PEFT-format adapters. Their split lives here so `methods` stays within its size:

    prompt  trainable = {"prompt_embeddings": [n, D]}            (prompt_tuning)
                      = {"prefix_embeddings": [n, L·2·K·Dh]}     (prefix_tuning)
                      = {"prefix_embeddings": [n, K·Dh], "prefix_mlp": {...}}  (prefix_projection)
            frozen    = base params; variables = {"params": frozen, "prompt": trainable}

What a run saves is PEFT's format (`jaxlora.io.peft_prompt`): `PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.peft.prompt import PromptAdapter, PromptConfig, init_prompt

PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")


def prompt_config_from(cfg: Config) -> PromptConfig:
    """The run's virtual-token settings from the config (PEFT's key names)."""
    f = cfg.finetune
    return PromptConfig(
        method=f.finetuning_type,
        num_virtual_tokens=f.num_virtual_tokens,
        prefix_projection=f.prefix_projection,
        encoder_hidden_size=f.encoder_hidden_size or 0,
        init_text=f.prompt_tuning_init_text if f.prompt_tuning_init == "text" else None,
    )


def continued_prompt(cfg: Config, params: dict) -> PromptAdapter:
    """The PEFT prompt / prefix adapter of `adapter_name_or_path`, checked against the run."""
    from jaxlora.io.peft import check_adapter_fits, load_peft_adapter

    path, method = cfg.model.adapter_name_or_path, cfg.finetune.finetuning_type
    start = load_peft_adapter(path)
    if not isinstance(start, PromptAdapter) or start.config.method != method:
        kind = start.config.method if isinstance(start, PromptAdapter) else "LoRA"
        raise UserError(
            f"adapter_name_or_path: {path} is a {kind} adapter; finetuning_type {method} "
            f"continues {method} adapters only"
        )
    if cfg.finetune.prefix_projection:
        raise UserError(
            f"adapter_name_or_path: {path}: a saved prefix adapter holds the projected prefix "
            "itself (PEFT saves the MLP's output), so there is no MLP to continue; drop "
            "`prefix_projection`"
        )
    check_adapter_fits(start, params, str(path))
    return start


def split_prompt(cfg: Config, params: dict, model_config: Any, tokenizer: Any = None):
    """(trainable prompt tree fp32, PromptConfig): a new one, or the continued adapter's (its
    num_virtual_tokens wins, as LoRA's rank does for a continued LoRA)."""
    if cfg.model.adapter_name_or_path:
        start = continued_prompt(cfg, params)
        tree, pcfg = start.params, start.config
    else:
        pcfg = prompt_config_from(cfg)
        ids = None
        if pcfg.init_text:
            if tokenizer is None:
                raise UserError(
                    "`prompt_tuning_init: text` needs the model's tokenizer (none in the "
                    "model directory)"
                )
            ids = list(tokenizer(pcfg.init_text)["input_ids"])  # PEFT: tokenizer(init_text)
            if not ids:
                raise UserError("`prompt_tuning_init_text` tokenises to no tokens")
        key = jax.random.key(cfg.train.seed)
        tree = init_prompt(key, params, model_config, pcfg, ids)
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree)
    return tree, pcfg


def split_bottleneck(cfg: Config, params: dict, model_config: Any):
    """(trainable "adapter" tree fp32, BottleneckConfig) for `finetuning_type: adapter`: new
    (zero up-projection: the run starts at the base model) or `adapter_name_or_path`'s (its
    size / non-linearity / placement win)."""
    from jaxlora.peft.bottleneck import BottleneckAdapter, BottleneckConfig, init_bottleneck

    f = cfg.finetune
    if cfg.model.adapter_name_or_path:
        from jaxlora.io.peft import check_adapter_fits, load_peft_adapter

        path = cfg.model.adapter_name_or_path
        start = load_peft_adapter(path)
        if not isinstance(start, BottleneckAdapter):
            raise UserError(
                f"adapter_name_or_path: {path} is not a bottleneck adapter; finetuning_type "
                "adapter continues adapters written by a `finetuning_type: adapter` run"
            )
        check_adapter_fits(start, params, str(path))
        tree, bcfg = start.params, start.config
    else:
        bcfg = BottleneckConfig(f.adapter_size, f.adapter_non_linearity, f.adapter_placement)
        tree = init_bottleneck(jax.random.key(cfg.train.seed), model_config, bcfg)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), tree), bcfg
