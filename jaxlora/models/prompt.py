"""Virtual-token methods in the model: prompt tuning and prefix tuning as per-layer KV prefixes.

Why this file exists: both methods put `n` learned "virtual tokens" before every sequence, and
the decoder treats them the same way: as n extra keys/values at the front of every layer's
attention, visible to every query, with the real tokens' RoPE positions shifted by n (PEFT's
prompt tuning puts the virtual tokens at positions 0..n-1; its prefix tuning hands them to the
model as a cache of length n, so real tokens start at position n).

- Prefix tuning (variable collection "prompt", leaf `prefix_embeddings`): the prefix IS the
  per-layer keys/values, PEFT's flat layout [n, L·2·K·Dh] (reshaped to [n, 2L, K, Dh]; entry 2l is
  layer l's keys, 2l+1 its values; keys are used as they are, without RoPE, as HF does with a
  past-key-value cache). With reparameterisation (`prefix_mlp`), the flat prefix is
  `Linear(tanh(Linear(E)))` of a smaller [n, K·Dh] embedding E, PEFT's `prefix_projection`.
- Prompt tuning (leaf `prompt_embeddings` [n, D]): the virtual tokens are input embeddings.
  Under causal attention they attend only to each other, so their per-layer keys/values do not
  depend on the real tokens: the decoder runs them once through the layers (the KV-cache path,
  positions 0..n-1) and then uses those keys/values as the prefix. This equals PEFT's
  concatenation of [prompts; token embeddings] for every real position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.models.config import ModelConfig

COLLECTION = "prompt"
PROMPT_KEY = "prompt_embeddings"  # prompt tuning: [n, D]
PREFIX_KEY = "prefix_embeddings"  # prefix tuning: [n, L*2*K*Dh], or [n, K*Dh] with prefix_mlp
MLP_KEY = "prefix_mlp"  # {"w1": [K*Dh, H], "b1": [H], "w2": [H, L*2*K*Dh], "b2": [L*2*K*Dh]}


def prefix_width(cfg: ModelConfig) -> int:
    """Flat prefix width per virtual token: L layers x (key, value) x K heads x Dh."""
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim


def flat_prefix(tree: dict) -> jax.Array:
    """The flat [n, L*2*K*Dh] prefix (fp32): stored as is, or through the reparameterisation MLP."""
    emb = jnp.asarray(tree[PREFIX_KEY], jnp.float32)
    mlp = tree.get(MLP_KEY)
    if mlp is None:
        return emb
    h = jnp.tanh(emb @ mlp["w1"] + mlp["b1"])  # [n, H]
    return h @ mlp["w2"] + mlp["b2"]  # [n, L*2*K*Dh]


def layer_prefix(flat: jax.Array, cfg: ModelConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """PEFT's flat prefix -> (keys, values), each [L, 1, n, K, Dh] in the compute dtype."""
    n = flat.shape[0]
    l, k, dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    kv = flat.reshape(n, 2 * l, k, dh).transpose(1, 0, 2, 3)  # [2L, n, K, Dh]
    return kv[0::2, None].astype(dtype), kv[1::2, None].astype(dtype)


def num_virtual_tokens(tree: dict | None) -> int:
    if not tree:
        return 0
    key = PROMPT_KEY if PROMPT_KEY in tree else PREFIX_KEY
    return int(tree[key].shape[0])
