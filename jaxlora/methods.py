"""Fine-tuning methods: how a config splits the model into trainable and frozen trees.

    lora   trainable = adapter (fp32), frozen = base params (bf16 / fp32)
    full   trainable = all params (fp32 master copy), frozen = {}

`split_trainable` is the one place that decides this; the train step only sees the two trees
and `mode`, and `steps.variables_for` puts them back together for the forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.lora import LoraConfig, init_lora, parse_targets
from jaxlora.model_api import Model, load_model
from jaxlora.models.linear import AdapterSpec


@dataclasses.dataclass
class Split:
    mode: str  # "lora" | "full"
    trainable: Any
    frozen: Any
    lora_config: LoraConfig | None = None

    @property
    def adapter_spec(self) -> AdapterSpec | None:
        return self.lora_config.spec if self.lora_config else None


def load_base_model(cfg: Config, model_path: Any, dtype: Any) -> Model:
    """The base model as training needs it (frozen dtype; quantised when configured)."""
    return load_model(model_path, dtype=dtype)


def lora_config_from(cfg: Config) -> LoraConfig:
    f = cfg.finetune
    return LoraConfig(
        rank=f.lora_rank,
        alpha=f.resolved_lora_alpha,
        dropout=f.lora_dropout,
        targets=parse_targets(f.lora_target),
        use_rslora=f.use_rslora,
        use_dora=f.use_dora,
    )


def split_trainable(cfg: Config, params: dict) -> Split:
    """Trainable/frozen trees for `cfg.finetune.finetuning_type` (trainable leaves in fp32)."""
    mode = cfg.finetune.finetuning_type
    key = jax.random.key(cfg.train.seed)
    if mode == "lora":
        lcfg = lora_config_from(cfg)
        if cfg.model.adapter_name_or_path:
            from jaxlora.checkpoints.peft import check_adapter_fits, load_peft_adapter

            start = load_peft_adapter(cfg.model.adapter_name_or_path)
            check_adapter_fits(start, params, cfg.model.adapter_name_or_path)
            lcfg, trainable = start.config, start.params
        else:
            trainable = init_lora(key, params, lcfg)
        split = Split("lora", trainable, params, lcfg)
    elif mode == "full":
        split = Split("full", params, {})
    else:
        raise UserError(f"finetuning_type {mode!r} is not supported; use lora or full")
    split.trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), split.trainable)
    return split
