"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): small layers inside each block.

Why this file exists: `finetuning_type: adapter` trains, in every decoder layer, one or two
bottlenecks h -> h + up(act(down(h))) (down: [D, r], up: [r, D], with biases) on the output of
attention and/or the MLP, before the residual add (`jaxlora.models.llama.DecoderLayer`):

    houlsby   after attention AND after the MLP (the original placement)
    pfeiffer  after the MLP only (half the parameters, about the same quality)

The up-projection starts at zero, so a new adapter is exactly the base model (training starts
there, and a DPO / KTO reference is the base). This module makes the trainable tree, the
"adapter" collection: {"layers": {"{attn|mlp}_{down|down_b|up|up_b}": [L, ...]}} (stacked per
layer like the scanned base). Files: `jaxlora.io.bottleneck`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.models.linear import BOTTLENECK_ACTS, AdapterSpec
from jaxlora.models.llama import BOTTLENECK

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    size: int = 64  # bottleneck width r
    non_linearity: str = "relu"
    placement: str = "houlsby"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise UserError(f"adapter placement must be houlsby or pfeiffer, got {self.placement}")
        if self.non_linearity not in BOTTLENECK_ACTS:
            raise UserError(
                f"adapter non-linearity must be one of {', '.join(BOTTLENECK_ACTS)}, "
                f"got {self.non_linearity}"
            )
        if self.size < 1:
            raise UserError(f"adapter_size must be >= 1, got {self.size}")

    @property
    def positions(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement]

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(bottleneck_act=self.non_linearity)


@dataclasses.dataclass
class BottleneckAdapter:
    """Trained bottleneck adapters: `params` is the model's "adapter" collection."""

    params: dict
    config: BottleneckConfig
    collection = BOTTLENECK

    @property
    def spec(self) -> AdapterSpec:
        return self.config.spec


def init_bottleneck(key: jax.Array, model_config: Any, config: BottleneckConfig) -> dict:
    """The initial "adapter" collection (fp32): down ~ N(0, 0.02²) (BERT-style init, as the
    `adapters` library's default), biases and the up-projection zero (identity at step 0)."""
    n, d, r = model_config.num_hidden_layers, model_config.hidden_size, config.size
    layers = {}
    for k, where in zip(jax.random.split(key, 2), config.positions, strict=False):
        layers[f"{where}_down"] = 0.02 * jax.random.normal(k, (n, d, r), jnp.float32)
        layers[f"{where}_down_b"] = jnp.zeros((n, r), jnp.float32)
        layers[f"{where}_up"] = jnp.zeros((n, r, d), jnp.float32)
        layers[f"{where}_up_b"] = jnp.zeros((n, d), jnp.float32)
    return {"layers": layers}
