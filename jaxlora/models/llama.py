"""Flax (linen) decoder for the Llama family: Llama 2/3/3.1+, Qwen2/2.5, Qwen3, Mistral, Gemma 2/3
(text), and the mixture-of-experts Qwen3-MoE and Mixtral (their MLP is
`jaxlora.models.moe.SparseMoe`).

The families differ only by flags in `ModelConfig` (biases, q/k norms, rope scaling, sliding
window, experts; Gemma's norms, GeGLU, soft-caps and per-layer window/RoPE: `models/gemma.py`).
Layers run under `nn.scan`, so every per-layer parameter carries a leading
layer axis and compile time does not grow with depth. Parameter names mirror the Hugging Face
module names (`layers/self_attn/q_proj/kernel` <-> `model.layers.{i}.self_attn.q_proj.weight`),
which keeps checkpoint I/O and PEFT export a renaming exercise.

Variable collections: "params" (the frozen or fully trained base), the optional "lora" (adapter,
same paths), the optional "prompt" (prompt / prefix tuning, see `jaxlora.models.prompt`) and the
optional "adapter" (bottleneck adapters after attention and/or the MLP of every layer).
Every projection goes through `Linear`, the single place where adapters and quantised weights
plug in; virtual tokens enter as per-layer key/value prefixes in `Attention`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models import gemma
from jaxlora.models import prompt as vt
from jaxlora.models.attention import AttentionSpec, attention, causal_mask
from jaxlora.models.config import ModelConfig
from jaxlora.models.decode import decode_attention, is_decode_step
from jaxlora.models.linear import BOTTLENECK_ACTS, AdapterSpec, Linear
from jaxlora.models.moe import MOE_BLOCK, SparseMoe, aux_loss

BOTTLENECK = "adapter"  # variable collection of bottleneck adapters (per layer, scanned)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(cfg: ModelConfig, seq_len: int) -> jax.Array:
    """Inverse frequencies [head_dim/2] incl. linear / dynamic-NTK / llama3 scaling (as HF)."""
    dim = cfg.head_dim
    base = cfg.rope_theta
    rope = cfg.rope
    if cfg.rope_type == "dynamic":
        # Dynamic NTK: the base grows once the sequence exceeds the trained context.
        max_pos = rope.get("original_max_position_embeddings", cfg.max_position_embeddings)
        factor = rope["factor"]
        if seq_len > max_pos:
            base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_type == "linear":
        inv = inv / rope["factor"]
    elif cfg.rope_type == "llama3":
        factor = rope["factor"]
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old_ctx = rope.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, seq_len: int) -> tuple[jax.Array, ...]:
    """cos, sin of shape [B, T, head_dim] in fp32 (HF layout: the half-frequencies repeated)."""
    inv = rope_inv_freq(cfg, seq_len)  # [Dh/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, Dh]; rotate-half convention of the HF Llama implementation."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    xf = x.astype(jnp.float32)
    out = xf * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- masks


def attention_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, T]: causal, same segment, key not padding (segment 0), within window."""
    return causal_mask(segment_ids, sliding_window)


def head_weight(params: dict, cfg: ModelConfig) -> tuple[jax.Array, bool]:
    """The LM head as stored and whether it is vocab-major: ([V, D] embedding, True) when tied,
    else ([D, V] kernel, False). Consumers contract over D as stored (`losses.head_subscript`):
    inside a train step XLA:CPU materialised `embedding.T` (a transpose plus a relayout copy of
    the whole matrix, ~0.3 s per SmolLM2 step, benchmarks/RESULTS.md)."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    eps: float = 1e-6
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    plus_one: bool = False  # Gemma: weight stored as w, applied as (1 + w), zeros-initialised

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ones = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        init = nn.with_logical_partitioning(ones, ("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:  # Gemma multiplies in fp32 and casts after (transformers #29402)
            return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        # HF casts back to the input dtype before multiplying by the weight.
        return (scale.astype(self.dtype) * x32.astype(self.dtype)).astype(self.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any
    adapter: AdapterSpec | None
    deterministic: bool
    attention: AttentionSpec = AttentionSpec()

    def _linear(self, features: int, bias: bool, axes: tuple[str, str], name: str) -> Linear:
        return Linear(
            features,
            use_bias=bias,
            kernel_axes=axes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x, cos, sin, mask, segment_ids, cache=None, cache_index=None, prefix=None, slide=None
    ):
        """`slide`: this layer's scanned sliding-window flag (configs with mixed layer types)."""
        cfg = self.cfg
        b, t, _ = x.shape
        nh, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = self._linear(nh * hd, cfg.qkv_bias, ("embed", "q_heads"), "q_proj")(x)
        k = self._linear(kh * hd, cfg.qkv_bias, ("embed", "kv_heads"), "k_proj")(x)
        v = self._linear(kh * hd, cfg.qkv_bias, ("embed", "kv_heads"), "v_proj")(x)
        q = q.reshape(b, t, nh, hd)  # [B, T, N, Dh]
        k = k.reshape(b, t, kh, hd)  # [B, T, K, Dh]
        v = v.reshape(b, t, kh, hd)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            norm["plus_one"] = cfg.norm_plus_one
            q = RMSNorm(**norm, name="q_norm")(q)
            k = RMSNorm(**norm, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        new_cache = None
        scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
        kw = dict(scale=scale, softcap=cfg.attn_logit_softcap, spec=self.attention)
        if cache is not None and is_decode_step(t, segment_ids, prefix):
            # Decode: read the cache, return only this step's [B, 1, K, Dh] key/value; the
            # decoder writes them at cache_index after the layers (models/decode.py).
            ck, cv = cache
            k, v = k.astype(ck.dtype), v.astype(cv.dtype)
            old = gemma.pick(slide, mask) & (jnp.arange(ck.shape[1]) != cache_index)
            out = decode_attention(q, ck, cv, k, v, old, scale, cfg.attn_logit_softcap)
            new_cache = (k, v)
        else:
            if cache is not None:
                # Write this step's keys/values at cache_index. Prefill (segment ids given, the
                # cache empty before it) attends within the fresh block with the selected kernel;
                # with virtual tokens (prefix) the whole cache is attended with the cache mask.
                ck, cv = cache
                new_cache = (
                    jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0)),
                    jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0)),
                )
                if segment_ids is None or prefix is not None:
                    k, v = (c.astype(self.dtype) for c in new_cache)  # over the cache, its mask
                else:
                    mask = None
            if prefix is not None:
                # Virtual tokens: n keys/values in front, visible to every query (also padding
                # queries, whose outputs nobody reads; this keeps their softmax finite). No flash
                # kernel takes extra always-visible keys: this runs dense.
                if mask is None:
                    mask = gemma.layer_mask(cfg, segment_ids, slide)
                mask = gemma.pick(slide, mask)
                pk, pv = (jnp.broadcast_to(p, (b, *p.shape[1:])).astype(k.dtype) for p in prefix)
                n = pk.shape[1]
                k = jnp.concatenate([pk, k], axis=1)  # [B, n+S, K, Dh]
                v = jnp.concatenate([pv, v], axis=1)
                mask = jnp.concatenate([jnp.ones((*mask.shape[:3], n), bool), mask], axis=-1)
            if mask is not None:
                out = attention(q, k, v, mask=gemma.pick(slide, mask), **kw)  # [B, T, N, Dh]
            else:  # this layer's window (Gemma: per layer)
                out = gemma.layer_attention(q, k, v, segment_ids, slide, cfg, **kw)
        out = out.reshape(b, t, nh * hd)
        out = self._linear(cfg.hidden_size, cfg.o_bias, ("q_heads", "embed"), "o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any
    adapter: AdapterSpec | None
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kw = dict(
            use_bias=cfg.mlp_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
        )
        f, d = cfg.intermediate_size, cfg.hidden_size
        gate = Linear(f, kernel_axes=("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear(f, kernel_axes=("embed", "mlp"), name="up_proj", **kw)(x)
        if cfg.hidden_act == "silu":
            h = jax.nn.silu(gate) * up  # [B, T, F]
        else:  # Gemma's GeGLU: gelu_pytorch_tanh is the tanh approximation
            h = jax.nn.gelu(gate, approximate=True) * up
        return Linear(d, kernel_axes=("mlp", "embed"), name="down_proj", **kw)(h)


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    dtype: Any
    param_dtype: Any
    adapter: AdapterSpec | None
    deterministic: bool
    attention: AttentionSpec = AttentionSpec()

    @nn.compact
    def __call__(self, x, cos, sin, mask, segment_ids, cache, cache_index, prefix=None, slide=None):
        cfg = self.cfg
        cos, sin = gemma.pick(slide, cos), gemma.pick(slide, sin)  # this layer's [B, T, Dh]
        sub = dict(
            cfg=cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
        )
        norm = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        norm["plus_one"] = cfg.norm_plus_one
        h = RMSNorm(**norm, name="input_layernorm")(x)
        h, new_cache = Attention(**sub, attention=self.attention, name="self_attn")(
            h, cos, sin, mask, segment_ids, cache, cache_index, prefix, slide
        )
        if cfg.sandwich_norms:  # Gemma: the attention output is normed before the residual
            h = RMSNorm(**norm, name="post_attention_layernorm")(h)
        x = x + self._bottleneck("attn", h)
        pre_mlp = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
        h = RMSNorm(**norm, name=pre_mlp)(x)
        stats = None  # MoE: [2, E] router statistics of this layer (scan output)
        if cfg.num_experts:
            mask = jnp.ones(h.shape[:2], bool) if segment_ids is None else segment_ids != 0
            h, stats = SparseMoe(**sub, name=MOE_BLOCK[cfg.model_type])(h, mask)
        else:
            h = MLP(**sub, name="mlp")(h)
        if cfg.sandwich_norms:
            h = RMSNorm(**norm, name="post_feedforward_layernorm")(h)
        x = x + self._bottleneck("mlp", h)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return x, (new_cache, stats)

    def _bottleneck(self, where: str, h: jax.Array) -> jax.Array:
        """h + up(act(down(h))) with the "adapter" collection's `{where}_down/_up` (+ biases)
        when this run has bottleneck adapters there (Houlsby: attn and mlp; Pfeiffer: mlp),
        else h. The up-projection starts at zero, so a new adapter is the identity."""
        spec = self.adapter
        if spec is None or spec.bottleneck_act is None:
            return h
        if not self.has_variable(BOTTLENECK, f"{where}_down"):
            return h

        def get(name):
            return self.get_variable(BOTTLENECK, f"{where}_{name}").astype(self.dtype)

        act = BOTTLENECK_ACTS[spec.bottleneck_act]
        z = act(h @ get("down") + get("down_b"))  # [B, T, r]
        return h + z @ get("up") + get("up_b")  # [B, T, D]


class Decoder(nn.Module):
    """Causal LM. Returns fp32 logits [B, T, V], or final normed hidden states [B, T, D]."""

    cfg: ModelConfig
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    adapter: AdapterSpec | None = None
    deterministic: bool = True
    remat: str = "none"
    scan_unroll: int = 1
    attention: AttentionSpec = AttentionSpec()  # kernel choice (models/attention.py)

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        layer = DecoderLayer
        policy = REMAT_POLICIES[self.remat]
        if self.remat != "none":
            layer = nn.remat(layer, policy=policy, prevent_cse=False)
        self.layers = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0, BOTTLENECK: 0},
            split_rngs={"params": True, "dropout": True},
            # cos, sin, mask, segment ids, cache, cache index, prefix, sliding flag
            in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast, 0, 0),
            length=cfg.num_hidden_layers,
            unroll=self.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            cfg=cfg,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            adapter=self.adapter,
            deterministic=self.deterministic,
            attention=self.attention,
        )
        self.norm = RMSNorm(
            cfg.rms_norm_eps, self.dtype, self.param_dtype, plus_one=cfg.norm_plus_one
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        positions: jax.Array | None = None,  # [B, T] int, restart per packed segment
        segment_ids: jax.Array | None = None,  # [B, T] int, 0 = padding
        *,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,  # ([L, B, S, K, Dh]) x 2
        cache_index: jax.Array | None = None,
        attn_mask: jax.Array | None = None,  # [B, 1, T, S] cache mask (decode; dense)
        return_hidden: bool = False,
        return_aux_loss: bool = False,
    ):
        """Without a cache, attention is causal within `segment_ids` (all ones if None). With a
        cache: `attn_mask` is the mask over the cache; prefill into an empty cache may also
        pass `segment_ids` (0 = left padding) so the flash kernel serves it.

        `return_aux_loss` (no cache): returns (out, router load-balancing loss), the loss over
        the non-padding tokens (segment id != 0) as transformers computes it; 0 for dense
        models."""
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        prefix = self._virtual_prefix()
        if prefix is not None:
            positions = positions + prefix[0].shape[2]  # real tokens follow the n virtual ones
        if attn_mask is None and segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        rope_len = t if kv_cache is None else kv_cache[0].shape[2]
        cos, sin = gemma.rope_tables(self.cfg, positions, rope_len, rope_cos_sin)
        x = self.embed_tokens(input_ids).astype(self.dtype)  # [B, T, D]
        if self.cfg.embed_scale:  # Gemma: x sqrt(D), the factor rounded to the activation dtype
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        slide = gemma.sliding_flags(self.cfg)  # [L] bool, scanned
        x, (new_cache, stats) = self.layers(
            x, cos, sin, attn_mask, segment_ids, kv_cache, cache_index, prefix, slide
        )
        if kv_cache is not None and is_decode_step(t, segment_ids, prefix):
            # The layers returned this step's [L, B, 1, K, Dh] keys/values: write them into the
            # cache in place (inside a decode loop the cache buffer is the loop's own carry).
            new_cache = tuple(
                jax.lax.dynamic_update_slice(c, n, (0, 0, cache_index, 0, 0))
                for c, n in zip(kv_cache, new_cache, strict=True)
            )
        x = self.norm(x)  # [B, T, D]
        if return_hidden:
            out = x
        elif self.cfg.tie_word_embeddings:
            out = self.embed_tokens.attend(x).astype(jnp.float32)
        else:
            out = self.lm_head(x).astype(jnp.float32)  # [B, T, V]
        if not return_hidden:
            out = gemma.softcap(out, self.cfg.final_logit_softcap)
        if kv_cache is not None:
            return out, new_cache
        if return_aux_loss:
            aux = jnp.float32(0.0) if stats is None else aux_loss(stats, segment_ids != 0)
            return out, aux
        return out

    def _virtual_prefix(self) -> tuple[jax.Array, jax.Array] | None:
        """Per-layer (keys, values) [L, 1, n, K, Dh] of the "prompt" collection, or None."""
        if not self.has_variable(vt.COLLECTION, vt.PROMPT_KEY) and not self.has_variable(
            vt.COLLECTION, vt.PREFIX_KEY
        ):
            return None
        tree = self.variables[vt.COLLECTION]
        if vt.PREFIX_KEY in tree:
            return vt.layer_prefix(vt.flat_prefix(tree), self.cfg, self.dtype)
        # Prompt tuning: run the virtual embeddings [1, n, D] through the layers once (cache path,
        # causal among themselves, positions 0..n-1) and keep each layer's keys/values.
        emb = jnp.asarray(tree[vt.PROMPT_KEY]).astype(self.dtype)[None]  # [1, n, D]
        n = emb.shape[1]
        pos = jnp.arange(n, dtype=jnp.int32)[None]
        cos, sin = gemma.rope_tables(self.cfg, pos, n, rope_cos_sin)
        seg = jnp.ones((1, n), jnp.int32)
        causal = causal_mask(seg, gemma.static_window(self.cfg))  # [1, 1, n, n]
        if gemma.mixed_layers(self.cfg):
            causal = gemma.PerKind(causal, causal_mask(seg, self.cfg.sliding_window))
        shape = (self.cfg.num_hidden_layers, 1, n, self.cfg.num_key_value_heads, self.cfg.head_dim)
        cache = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
        slide = gemma.sliding_flags(self.cfg)
        _, ((keys, values), _) = self.layers(
            emb, cos, sin, causal, None, cache, jnp.int32(0), None, slide
        )
        return keys, values
