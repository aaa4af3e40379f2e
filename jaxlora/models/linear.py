"""The one linear layer every projection goes through.

    y = x @ W (+ b) + scale * dropout(x) @ A @ B          (LoRA, when an adapter is present)

`W` comes from the "params" collection and may be a quantised dict (NF4 / int8, see
`jaxlora.models.quant`) that is dequantised here, inside the jitted computation. The adapter comes
from a
separate "lora" collection with the same module path, so the frozen base and the trainable
adapter are two pytrees: gradients, optimiser state and checkpoints only ever see the adapter.
DoRA adds a "magnitude" vector to the same collection.

DoRA follows PEFT's `DoraLinearLayer.forward` exactly (bias and dropout included):

    y = x @ W + b + (m / n - 1) * (x' @ W) + (m / n) * scale * x' @ A @ B,
    n = ||W + scale * A @ B|| per output column, detached (no gradient through the norm),

where x' = dropout(x) while training with dropout and x' = x otherwise (then x' @ W is the base
output without its bias, as PEFT's `base_result - bias`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models import quant


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Static (hashable) settings of the adapter applied in every targeted linear layer."""

    scale: float = 1.0  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    dropout: float = 0.0
    use_dora: bool = False
    # Bottleneck adapters (collection "adapter", see `jaxlora.models.llama.DecoderLayer`): the
    # non-linearity between their down- and up-projection; None when the run has none.
    bottleneck_act: str | None = None


# Non-linearities of bottleneck adapters (torch's defaults: exact GELU, SiLU for "swish").
BOTTLENECK_ACTS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * x @ A @ B in the compute dtype of x; A: [in, r], B: [r, out]."""
    return ((x @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)


def dora_column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """||W + scale * A @ B|| over the input axis, per output feature: [out], fp32, no gradient.

    PEFT detaches this norm (DoRA paper section 4.3) so the backward pass does not go through it.
    """
    w32 = w.astype(jnp.float32) + scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w32 * w32, axis=-2)))


def adapter_output(
    x: jax.Array,
    xd: jax.Array,
    xw: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    magnitude: jax.Array | None = None,
) -> jax.Array:
    """What the adapter adds to the base output `x @ W + bias`.

    x: input [.., in]; xd: dropout(x) (x itself when dropout is off); xw = x @ W without bias;
    w: dense kernel [in, out] in the compute dtype; magnitude: DoRA's [out] or None (LoRA).
    """
    delta = lora_delta(xd, a, b, scale)  # [.., out]
    if magnitude is None:
        return delta
    norm = dora_column_norm(w, a, b, scale)  # [out] fp32, no gradient
    mag_scale = (magnitude.astype(jnp.float32) / norm).astype(x.dtype)
    base = xw if xd is x else xd @ w  # PEFT recomputes the base on the dropped-out input
    return (mag_scale - 1) * base + mag_scale * delta


class Linear(nn.Module):
    features: int
    use_bias: bool = False
    kernel_axes: tuple[str, str] = ("embed", "mlp")
    dtype: Any = jnp.bfloat16  # compute dtype
    param_dtype: Any = jnp.float32
    adapter: AdapterSpec | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_features = x.shape[-1]
        if self.is_initializing():
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes)
            kernel = self.param("kernel", init, (in_features, self.features), self.param_dtype)
        else:
            # get_variable, not param: a quantised kernel is a dict whose shapes differ from
            # the [in, out] that `param` would validate against.
            kernel = self.get_variable("params", "kernel")
        # A quantised frozen weight (QLoRA) is dequantised here, inside the jitted forward.
        w = quant.dequantize(kernel, self.dtype)  # [in, out]
        x = x.astype(self.dtype)
        xw = x @ w  # [.., out]
        y = xw
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[1],))
            y = y + self.param("bias", init, (self.features,), self.param_dtype).astype(self.dtype)
        if self.adapter is None or not self.has_variable("lora", "lora_a"):
            return y
        a = self.get_variable("lora", "lora_a")  # [in, r]
        b = self.get_variable("lora", "lora_b")  # [r, out]
        xd = x
        if self.adapter.dropout > 0.0 and not self.deterministic:
            xd = nn.Dropout(self.adapter.dropout)(x, deterministic=False)
        magnitude = None
        if self.adapter.use_dora and self.has_variable("lora", "magnitude"):
            magnitude = self.get_variable("lora", "magnitude")  # [out]
        return y + adapter_output(x, xd, xw, w, a, b, self.adapter.scale, magnitude)
