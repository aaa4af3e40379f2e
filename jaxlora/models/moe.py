"""Mixture-of-experts MLP of Qwen3-MoE and Mixtral: router, top-k routing, stacked experts.

Why this file exists: an MoE layer replaces the dense SwiGLU MLP of the decoder by E SwiGLU
experts and a linear router that sends every token to k of them. It is its own module so the
dense decoder (`jaxlora.models.llama`) only chooses which MLP a layer has.

Routing follows transformers 5 exactly (`Qwen3MoeTopKRouter`, `MixtralTopKRouter`):

    logits = h @ W_router                      [N, E] in the compute dtype (no bias)
    probs  = softmax(fp32(logits))             softmax BEFORE top-k, in fp32
    w, e   = top_k(probs, k)                   [N, k]
    w      = w / sum(w)                        Mixtral always; Qwen3-MoE when norm_topk_prob
    w      = w.astype(logits dtype)            Qwen3-MoE only (Mixtral keeps the weights fp32)
    y      = sum_j w_j * down_e(silu(gate_e(h)) * up_e(h))     over the k chosen experts e

Experts are stacked weights, kernels [E, in, out] (transposes of HF's per-expert [out, in]
`mlp.experts.{e}.gate_proj.weight` / Mixtral's `block_sparse_moe.experts.{e}.w1.weight`; the
param tree uses the checkpoint's module names, `EXPERT_NAMES` / `MOE_BLOCK`). The k copies of
every token are sorted by expert and each projection is ONE grouped matmul,
`jax.lax.ragged_dot` (group sizes = tokens per expert): no Python loop over experts and no
E-fold dense compute. Its gradient works on CPU in JAX 0.10.2 and 0.12 (checked against
per-expert matmuls), so no dense dispatch einsum is needed. Nothing is dropped (no capacity
factor), as in transformers, so tokens never interact and a packed row routes exactly as each
sample alone.

Expert parallelism: the kernels' E axis carries the logical name "expert" (mesh axis "expert",
`jaxlora.parallel.sharding`). Under GSPMD the routing (top-k, sort) runs on the gathered global
batch and each device applies its own experts, the outputs all-reduced over the expert axis;
the expert weights are never gathered. There is no hand-written all-to-all dispatch.

LoRA on experts ("lora" collection, same paths): per expert A [E, in, r] and B [E, r, out],
applied with the same ragged matmuls; PEFT names them per expert (see `jaxlora.io.peft`).

The router auxiliary loss is transformers' `load_balancing_loss_func` with the attention mask:
each layer returns its masked count of top-k choices per expert and its masked sum of router
probabilities per expert ([2, E]); `aux_loss` concatenates the layers as transformers does.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.models import quant
from jaxlora.models.linear import AdapterSpec, Linear

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
# Module names mirror the checkpoints: Qwen3-MoE `mlp.experts.{e}.{gate,up,down}_proj`,
# Mixtral `block_sparse_moe.experts.{e}.{w1,w3,w2}` (gate, up, down).
EXPERT_NAMES = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
MOE_BLOCK = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}


def moe_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The MoE fields of `ModelConfig` from an HF config dict of a `MOE_MODEL_TYPES` model."""
    model_type = raw["model_type"]
    n_layers = int(raw["num_hidden_layers"])
    # transformers 5 writes `num_local_experts` for both families (`num_experts` is an alias).
    experts = int(raw.get("num_local_experts", raw.get("num_experts", 0)) or 0)
    if model_type == "mixtral":
        size = int(raw["intermediate_size"])
        norm_topk = True  # MixtralTopKRouter always renormalises the top-k weights
    else:
        size = int(raw.get("moe_intermediate_size") or 0)
        norm_topk = bool(raw.get("norm_topk_prob", False))
        step = int(raw.get("decoder_sparse_step", 1) or 1)
        dense = sorted(set(raw.get("mlp_only_layers") or []))
        dense += [i for i in range(n_layers) if (i + 1) % step and i not in dense]
        if experts <= 0 or dense:
            which = "every layer" if experts <= 0 else f"layers {sorted(dense)}"
            raise UserError(
                f"{source}: qwen3_moe with a dense MLP in {which} (mlp_only_layers / "
                "decoder_sparse_step / num_experts) is not supported: jaxlora scans one layer "
                "kind, so every layer must be a sparse MoE layer"
            )
        if not size:
            raise UserError(f"{source}: missing required field 'moe_intermediate_size'")
    top_k = int(raw.get("num_experts_per_tok", 2))
    if not 1 <= top_k <= experts:
        raise UserError(
            f"{source}: num_experts_per_tok {top_k} must be between 1 and the {experts} experts"
        )
    jitter = float(raw.get("router_jitter_noise", 0.0) or 0.0)
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=size,
        norm_topk_prob=norm_topk,
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
        output_router_logits=bool(raw.get("output_router_logits", False)),
        router_jitter_noise=jitter if model_type == "mixtral" else 0.0,
    )


def route(logits: jax.Array, k: int, norm_topk: bool, keep_fp32: bool):
    """(weights [N, k], experts [N, k] int32, fp32 probs [N, E]) from router logits [N, E]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_e = jax.lax.top_k(probs, k)
    if norm_topk:
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    if not keep_fp32:
        top_w = top_w.astype(logits.dtype)
    return top_w, top_e.astype(jnp.int32), probs


def router_stats(probs: jax.Array, top_e: jax.Array, mask: jax.Array) -> jax.Array:
    """[2, E] fp32: masked count of top-k choices per expert, masked sum of probs per expert.

    probs [N, E], top_e [N, k], mask [N] (1 = real token); `load_balancing_loss_func`'s
    per-layer `tokens_per_expert_sum` / `router_prob_sum` terms.
    """
    e = probs.shape[-1]
    m = mask.astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(top_e, e, dtype=jnp.float32) * m[:, None, None], axis=(0, 1))
    prob_sum = jnp.sum(probs * m[:, None], axis=0)
    return jnp.stack([counts, prob_sum])


def aux_loss(stats: jax.Array, mask: jax.Array) -> jax.Array:
    """transformers' `load_balancing_loss_func` from per-layer stats [L, 2, E] and the [B, T]
    token mask: E * sum_e (counts_e / (L * M)) * (probs_e / (L * M)), M = real tokens."""
    n_layers, _, e = stats.shape
    rows = n_layers * jnp.sum(mask.astype(jnp.float32))
    total = jnp.sum(stats, axis=0)  # [2, E]
    return e * jnp.sum((total[0] / rows) * (total[1] / rows))


class ExpertLinear(nn.Module):
    """E stacked projections applied to expert-sorted rows: x [M, in] -> [M, out]."""

    num_experts: int
    features: int
    kernel_axes: tuple[str, str, str] = ("expert", "embed", "mlp")
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    adapter: AdapterSpec | None = None
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        shape = (self.num_experts, x.shape[-1], self.features)
        if self.is_initializing():
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), self.kernel_axes)
            kernel = self.param("kernel", init, shape, self.param_dtype)
        else:
            kernel = self.get_variable("params", "kernel")
        w = quant.dequantize(kernel, self.dtype)  # [E, in, out]
        x = x.astype(self.dtype)
        y = jax.lax.ragged_dot(x, w, group_sizes)  # [M, out]
        if self.adapter is None or not self.has_variable("lora", "lora_a"):
            return y
        a = self.get_variable("lora", "lora_a").astype(self.dtype)  # [E, in, r]
        b = self.get_variable("lora", "lora_b").astype(self.dtype)  # [E, r, out]
        xd = x
        if self.adapter.dropout > 0.0 and not self.deterministic:
            xd = nn.Dropout(self.adapter.dropout)(x, deterministic=False)
        delta = jax.lax.ragged_dot(jax.lax.ragged_dot(xd, a, group_sizes), b, group_sizes)
        return y + delta * jnp.asarray(self.adapter.scale, self.dtype)


class SparseMoe(nn.Module):
    """Router + experts. x [B, T, D], token mask [B, T] -> (y [B, T, D], stats [2, E])."""

    cfg: Any  # ModelConfig
    dtype: Any
    param_dtype: Any
    adapter: AdapterSpec | None
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, d = x.shape
        e, k, f = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
        if cfg.router_jitter_noise > 0.0 and not self.deterministic:
            # Mixtral training: both the router and the experts see the jittered states.
            j = cfg.router_jitter_noise
            noise = jax.random.uniform(self.make_rng("dropout"), x.shape, jnp.float32, 1 - j, 1 + j)
            x = (x.astype(jnp.float32) * noise).astype(x.dtype)
        h = x.reshape(b * t, d)  # [N, D]
        router = Linear(
            e,
            kernel_axes=("embed", None),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="gate",
        )
        logits = router(h)  # [N, E], compute dtype (no adapter on the router)
        top_w, top_e, probs = route(logits, k, cfg.norm_topk_prob, cfg.model_type == "mixtral")
        stats = router_stats(probs, top_e, mask.reshape(-1))
        # Sort the N*k (token, expert) pairs by expert: each expert's rows are contiguous.
        flat_e = top_e.reshape(-1)  # [N*k]
        order = jnp.argsort(flat_e, stable=True)
        token = order // k  # source token of each sorted row
        sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)  # [E]
        xs = jnp.take(h, token, axis=0)  # [N*k, D]
        kw = dict(
            num_experts=e,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
        )
        names = EXPERT_NAMES[cfg.model_type]
        experts = ExpertsBlock(**kw, features=f, hidden=d, names=names, name="experts")
        ys = experts(xs, sizes)  # [N*k, D]
        w = jnp.take(top_w.reshape(-1), order)  # [N*k]
        ys = (ys * w[:, None]).astype(self.dtype)  # Mixtral: fp32 weights, cast back (as HF)
        out = jnp.zeros((b * t, d), self.dtype).at[token].add(ys)
        return out.reshape(b, t, d), stats


class ExpertsBlock(nn.Module):
    """The E SwiGLU experts (`experts`): gate, up and down projections as `ExpertLinear`."""

    num_experts: int
    features: int
    hidden: int
    names: tuple[str, str, str]  # gate, up, down module names (`EXPERT_NAMES`)
    dtype: Any
    param_dtype: Any
    adapter: AdapterSpec | None
    deterministic: bool

    @nn.compact
    def __call__(self, xs: jax.Array, sizes: jax.Array) -> jax.Array:
        kw = dict(
            num_experts=self.num_experts,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
        )
        up_axes = ("expert", "embed", "mlp")
        g, u, dn = self.names
        gate = ExpertLinear(features=self.features, kernel_axes=up_axes, name=g, **kw)
        up = ExpertLinear(features=self.features, kernel_axes=up_axes, name=u, **kw)
        down_axes = ("expert", "mlp", "embed")
        down = ExpertLinear(features=self.hidden, kernel_axes=down_axes, name=dn, **kw)
        hs = jax.nn.silu(gate(xs, sizes)) * up(xs, sizes)  # [N*k, F]
        return down(hs, sizes)  # [N*k, D]
