"""Prompt tuning and prefix tuning: the trainable "prompt" collection, its init and PEFT tensors.

Why this file exists: these methods train only n virtual tokens (how the decoder uses them is in
`jaxlora.models.prompt`). This module makes the trainable tree, pure functions only:

- prompt tuning: `prompt_embeddings` [n, D], random at the scale of the vocabulary's embeddings
  (see `init_prompt`) or from a text's token embeddings (PEFT's TEXT init: the text's ids
  repeated / cut to n);
- prefix tuning: `prefix_embeddings` [n, L·2·K·Dh] directly, or with reparameterisation
  (`prefix_projection`, the prefix-tuning paper's MLP, PEFT's `prefix_projection=True`)
  `prefix_embeddings` [n, K·Dh] + `prefix_mlp` (Linear → tanh → Linear, hidden
  `encoder_hidden_size`). The MLP only helps optimisation: what is saved (PEFT's format too) is
  its output, the flat [n, L·2·K·Dh] prefix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.models import prompt as vt
from jaxlora.models.config import ModelConfig

METHODS = ("prompt_tuning", "prefix_tuning")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    method: str  # prompt_tuning | prefix_tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int = 0  # 0 = the model's hidden size (prefix_projection only)
    init_text: str | None = None  # prompt tuning: PEFT's prompt_tuning_init_text

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown virtual-token method {self.method!r}; expected {METHODS}")
        if self.num_virtual_tokens < 1:
            raise UserError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")


@dataclasses.dataclass
class PromptAdapter:
    """Trained virtual tokens: `params` is the model's "prompt" collection."""

    params: dict
    config: PromptConfig
    collection = vt.COLLECTION
    spec = None  # no LoRA AdapterSpec: the Linear layers are untouched


def init_prompt(
    key: jax.Array,
    params: dict,
    model_config: ModelConfig,
    config: PromptConfig,
    init_ids: list[int] | None = None,
) -> dict:
    """The initial "prompt" collection (fp32).

    Prompt tuning: `init_ids` (a text's token ids, repeated / cut to n as PEFT does) pick rows of
    the embedding table; otherwise N(0, σ²) with σ the embedding table's std, so the virtual
    tokens start at the scale of real token embeddings. Prefix tuning: N(0, 0.02²) per entry
    (small, so the prefix starts close to "nothing to attend to"); the MLP uses PyTorch's default
    Linear init bounds (U(±1/√fan_in)), as PEFT's `nn.Linear` does.
    """
    n = config.num_virtual_tokens
    k1, k2, k3 = jax.random.split(key, 3)
    if config.method == "prompt_tuning":
        table = params["embed_tokens"]["embedding"]  # [V, D]
        if init_ids:
            ids = (list(init_ids) * (n // len(init_ids) + 1))[:n]
            emb = jnp.asarray(table, jnp.float32)[jnp.asarray(ids)]
        else:
            std = float(jnp.std(jnp.asarray(table[:4096], jnp.float32)))
            emb = std * jax.random.normal(k1, (n, table.shape[1]), jnp.float32)
        return {vt.PROMPT_KEY: emb}
    width = vt.prefix_width(model_config)
    if not config.prefix_projection:
        return {vt.PREFIX_KEY: 0.02 * jax.random.normal(k1, (n, width), jnp.float32)}
    d = model_config.num_key_value_heads * model_config.head_dim
    h = config.encoder_hidden_size or model_config.hidden_size

    def uniform(k, shape, fan_in):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

    k2a, k2b, k3a, k3b = (*jax.random.split(k2), *jax.random.split(k3))
    return {
        vt.PREFIX_KEY: jax.random.normal(k1, (n, d), jnp.float32),  # nn.Embedding: N(0, 1)
        vt.MLP_KEY: {
            "w1": uniform(k2a, (d, h), d),
            "b1": uniform(k2b, (h,), d),
            "w2": uniform(k3a, (h, width), h),
            "b2": uniform(k3b, (width,), h),
        },
    }


def peft_embeddings(adapter: PromptAdapter) -> np.ndarray:
    """The tensor PEFT saves as `prompt_embeddings`: [n, D] (prompt) or [n, L·2·K·Dh] (prefix,
    the MLP's output when reparameterised)."""
    tree = jax.device_get(adapter.params)
    if adapter.config.method == "prompt_tuning":
        return np.asarray(tree[vt.PROMPT_KEY], np.float32)
    return np.asarray(vt.flat_prefix(tree), np.float32)


def count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
