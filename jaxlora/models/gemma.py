"""The Gemma 2 / Gemma 3 pieces of the decoder that the other families do not have.

Why this file exists: `models/llama.py` runs every family with small flag branches; what is only
Gemma's lives here so those branches stay one line each:

  * alternating sliding-window / global layers (`layer_types`). Layers run under one `nn.scan`
    over stacked weights, so a layer cannot branch in Python on its index: the per-layer kind
    enters as a scanned bool (`sliding_flags`), and whatever differs per kind (RoPE tables,
    cache masks) is built once for each kind outside the scan and chosen inside it with
    `pick`; the attention kernel (whose window is static) runs under `lax.cond` on that flag
    (`Attention` in llama.py), so each layer runs only its own kernel;
  * the RoPE of the sliding layers (Gemma 3: `rope_local_base_freq`, never scaled);
  * soft-capping `c * tanh(x / c)` (attention scores and final logits, Gemma 2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.attention import attention, causal_mask
from jaxlora.models.config import SLIDING, ModelConfig


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """`cap * tanh(x / cap)` (elementwise; identity when cap is None)."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def mixed_layers(cfg: ModelConfig) -> bool:
    """True when some layers slide and others attend globally (the window is per layer)."""
    return cfg.layer_types is not None and len(set(cfg.layer_types)) > 1


def static_window(cfg: ModelConfig) -> int | None:
    """The sliding window every layer shares (None: global), for configs that are not mixed."""
    if cfg.layer_types is not None and SLIDING not in cfg.layer_types:
        return None
    return cfg.sliding_window


def sliding_flags(cfg: ModelConfig) -> jax.Array:
    """[L] bool, True for a sliding-window layer: the scanned per-layer input of the decoder."""
    types = cfg.layer_types or ()
    return jnp.asarray(np.array([t == SLIDING for t in types] or [False] * cfg.num_hidden_layers))


def local_rope_config(cfg: ModelConfig) -> ModelConfig | None:
    """The config whose RoPE the sliding layers use (Gemma 3), or None when all layers share one."""
    if cfg.rope_local_theta is None or not cfg.layer_types or SLIDING not in cfg.layer_types:
        return None
    return dataclasses.replace(cfg, rope_theta=cfg.rope_local_theta, rope_scaling=None)


def pick(sliding: jax.Array, value):
    """`value` is one pytree for all layers, or a `PerKind(full, sliding)` pair chosen by the
    traced per-layer flag (a select of two precomputed arrays: no recomputation per layer)."""
    if not isinstance(value, PerKind):
        return value
    return jax.tree_util.tree_map(lambda f, s: jnp.where(sliding, s, f), value.full, value.sliding)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PerKind:
    """Two versions of a layer input: for global (`full`) and for sliding-window layers."""

    full: object
    sliding: object

    def tree_flatten(self):
        return (self.full, self.sliding), None

    @classmethod
    def tree_unflatten(cls, _aux, children):
        return cls(*children)


def layer_mask(cfg: ModelConfig, segment_ids: jax.Array, slide: jax.Array | None) -> jax.Array:
    """This layer's dense causal mask [B, 1, T, T] (its own window when layers are mixed)."""
    mask = causal_mask(segment_ids, static_window(cfg))
    if not mixed_layers(cfg):
        return mask
    return jnp.where(slide, causal_mask(segment_ids, cfg.sliding_window), mask)


def layer_attention(q, k, v, segment_ids, slide, cfg: ModelConfig, **kw) -> jax.Array:
    """Uncached self-attention with this layer's window. A kernel's window is static, so mixed
    layers run `lax.cond` on the scanned flag: each layer executes only its own branch."""
    if not mixed_layers(cfg):
        return attention(q, k, v, segment_ids=segment_ids, window=static_window(cfg), **kw)

    def run(window):
        return lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, window=window, **kw)

    return jax.lax.cond(slide, run(cfg.sliding_window), run(None), q, k, v)


def rope_tables(cfg: ModelConfig, positions: jax.Array, rope_len: int, rope_fn):
    """cos, sin [B, T, Dh] from `rope_fn(cfg, positions, rope_len)`; a `PerKind` pair of each
    when the sliding layers have their own RoPE base (Gemma 3)."""
    # The barrier keeps cos/sin as buffers: otherwise XLA fuses (recomputes) the trigonometry
    # into every q/k RoPE fusion, per head, in every layer and in the backward.
    full = rope_fn(cfg, positions, rope_len)
    local = local_rope_config(cfg)
    if local is None:
        return jax.lax.optimization_barrier(full)
    full, sliding = jax.lax.optimization_barrier((full, rope_fn(local, positions, rope_len)))
    return PerKind(full[0], sliding[0]), PerKind(full[1], sliding[1])
