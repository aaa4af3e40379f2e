"""LoRA adapters as a separate pytree: init, scale, merge, trainable mask.

The adapter tree mirrors the targeted kernels of the param tree:

    params["layers"]["self_attn"]["q_proj"]["kernel"]      [L, in, out]   frozen base
    adapter["layers"]["self_attn"]["q_proj"]["lora_a"]     [L, in, r]     trainable, fp32
    adapter[...]["q_proj"]["lora_b"]     [L, r, out]    trainable, fp32 (zero init)
    adapter["layers"]["self_attn"]["q_proj"]["magnitude"]  [L, out]       DoRA only

Every function here is pure (pytree in, pytree out); the model reads the adapter from its "lora"
collection (see `jaxlora.models.linear`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError, did_you_mean
from jaxlora.models.linear import AdapterSpec, dora_column_norm

# HF module name -> path of its kernel's parent in the param tree.
LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "q_proj": ("layers", "self_attn", "q_proj"),
    "k_proj": ("layers", "self_attn", "k_proj"),
    "v_proj": ("layers", "self_attn", "v_proj"),
    "o_proj": ("layers", "self_attn", "o_proj"),
    "gate_proj": ("layers", "mlp", "gate_proj"),
    "up_proj": ("layers", "mlp", "up_proj"),
    "down_proj": ("layers", "mlp", "down_proj"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LINEAR_MODULES)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"  # kaiming (PEFT default) | gaussian | pissa

    @property
    def scale(self) -> float:
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def spec(self) -> AdapterSpec:
        return AdapterSpec(scale=self.scale, dropout=self.dropout, use_dora=self.use_dora)


@dataclasses.dataclass
class Adapter:
    """An adapter's weights and the settings needed to apply them."""

    params: dict
    config: LoraConfig

    @property
    def spec(self) -> AdapterSpec:
        return self.config.spec


def parse_targets(target: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`all` or a comma list of HF module names -> validated tuple (in canonical order)."""
    names = target.split(",") if isinstance(target, str) else list(target)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return tuple(LINEAR_MODULES)
    for n in names:
        if n not in LINEAR_MODULES:
            raise UserError(
                f"lora_target: unknown module {n!r}{did_you_mean(n, LINEAR_MODULES)}; valid: "
                + ", ".join(LINEAR_MODULES)
                + " or all"
            )
    if not names:
        raise UserError("lora_target is empty; use `all` or a comma list such as q_proj,v_proj")
    return tuple(n for n in LINEAR_MODULES if n in names)


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> dict:
    """Functional update: a new dict tree with `value` at `path` (siblings shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


def kernel_dims(kernel: Any) -> tuple[int, int, int]:
    """(num_layers, in, out) of a stacked kernel, quantised or not."""
    if isinstance(kernel, dict):
        from jaxlora import quant

        shape = quant.logical_shape(kernel)
    else:
        shape = kernel.shape
    return shape[0], shape[-2], shape[-1]


def init_lora(key: jax.Array, params: dict, cfg: LoraConfig) -> dict:
    """New adapter tree for `cfg.targets`: A random, B zero (so the model is unchanged)."""
    adapter: dict = {}
    for i, name in enumerate(cfg.targets):
        path = LINEAR_MODULES[name]
        kernel = get_path(params, path)["kernel"]
        n_layers, d_in, d_out = kernel_dims(kernel)
        k = jax.random.fold_in(key, i)
        if cfg.init == "gaussian":
            a = jax.random.normal(k, (n_layers, d_in, cfg.rank), jnp.float32) / cfg.rank
        else:
            # PEFT: kaiming_uniform_(a=sqrt(5)) on lora_A [r, in] -> U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(d_in)
            a = jax.random.uniform(k, (n_layers, d_in, cfg.rank), jnp.float32, -bound, bound)
        node = {"lora_a": a, "lora_b": jnp.zeros((n_layers, cfg.rank, d_out), jnp.float32)}
        if cfg.use_dora:
            w = _dense_kernel(kernel)
            node["magnitude"] = dora_column_norm(w, node["lora_a"], node["lora_b"], cfg.scale)
        adapter = set_path(adapter, path, node)
    return adapter


def _dense_kernel(kernel: Any, dtype: Any = jnp.float32) -> jax.Array:
    if isinstance(kernel, dict):
        from jaxlora import quant

        return quant.dequantize(kernel, dtype)
    return kernel.astype(dtype)


def merge(params: dict, adapter: Adapter) -> dict:
    """Base params with the adapter folded in: W' = W + s·A·B (DoRA: m · (W + s·A·B) / ‖·‖).

    Returns a new tree (untouched leaves shared); merged kernels keep the base dtype, or fp32
    when the base kernel is quantised.
    """
    out = params
    s = adapter.config.scale
    for path, node in iter_modules(adapter.params):
        base = get_path(params, path)["kernel"]
        w = _dense_kernel(base)
        a, b = node["lora_a"].astype(jnp.float32), node["lora_b"].astype(jnp.float32)
        merged = w + s * jnp.einsum("lir,lro->lio", a, b)
        if "magnitude" in node:
            norm = jnp.sqrt(jnp.sum(merged * merged, axis=-2, keepdims=True))
            merged = merged * (node["magnitude"][:, None, :] / norm)
        dtype = jnp.float32 if isinstance(base, dict) else base.dtype
        out = set_path(out, path + ("kernel",), merged.astype(dtype))
    return out


def iter_modules(adapter_params: dict):
    """Yield (module path, {lora_a, lora_b[, magnitude]}) for every adapted module."""
    for _name, path in LINEAR_MODULES.items():
        try:
            node = get_path(adapter_params, path)
        except KeyError:
            continue
        yield path, node


def adapter_targets(adapter_params: dict) -> tuple[str, ...]:
    return tuple(
        n for n, p in LINEAR_MODULES.items() if any(p == q for q, _ in iter_modules(adapter_params))
    )


def num_params(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
