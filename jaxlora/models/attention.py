"""Attention core for training on CPU: block-causal, with a recomputing (flash-style) backward.

Why this file exists: on XLA:CPU `jax.nn.dot_product_attention` computes all T x T scores of
every head, and autodiff inside the scanned layers saves the fp32 probabilities of every layer
([L, B, N, T, T]: zero-filled, stacked and read back each step). Here

  * query block [s, e) attends only to keys [0, e): the keys after it are masked by causality
    anyway, so skipping them is exact and the score work drops to (n+1)/(2n) of T x T;
  * the forward keeps only the output and the per-row log-sum-exp; the backward recomputes each
    block's probabilities from them (one extra Q K^T per block) instead of saving them.

GPUs/TPUs keep `jax.nn.dot_product_attention` (cuDNN / XLA fused kernels); decode with a KV cache
and short sequences too. The math, per query block (GQA: G query heads share one KV head):

    S = scale * Q K^T + bias,  P = exp(S - lse),  O = P V
    dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale * dS K,  dK = scale * dS^T Q,
    dV = P^T dO
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Query rows per block. 128 keeps a block's fp32 scores ([B, N, 128, <= T]) cache-sized.
ATTENTION_BLOCK = 128
_NEG = -1e30  # additive bias of a masked key (finite: a fully masked row stays finite)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, cached: bool
) -> jax.Array:
    """q [B,T,N,Dh], k/v [B,S,K,Dh], boolean mask [B,1,T,S] -> [B,T,N,Dh] in q's dtype.

    The block path needs a causal mask (key s never visible to query t < s) and T == S, which
    holds for every mask `llama.attention_mask` builds; `cached` (decode) always goes dense.
    """
    t, s = q.shape[1], k.shape[1]
    if not cached and t == s and t >= 2 * ATTENTION_BLOCK and jax.default_backend() == "cpu":
        return block_causal_attention(q, k, v, mask, scale, ATTENTION_BLOCK)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _scores(qb, k, mask_b, scale):
    """fp32 [B, K, G, blk, e] masked scores of query block qb [B, blk, K, G, Dh] vs k[:, :e]."""
    s = jnp.einsum("btkgd,bskd->bkgts", qb, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_b[:, :, None], s, _NEG)  # mask_b [B, 1, blk, e] -> [B, 1, 1, blk, e]


def _forward(q, k, v, mask, scale, block):
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)  # [B, T, K, G, Dh]
    outs, lses = [], []
    for start, end in _blocks(t, block):
        s = _scores(qg[:, start:end], k[:, :end], mask[:, :, start:end, :end], scale)
        m = jnp.max(s, axis=-1, keepdims=True)  # [B, K, G, blk, 1]
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(
            "bkgts,bskd->btkgd", p.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32
        )  # [B, blk, K, G, Dh], not yet normalised
        outs.append((o / jnp.moveaxis(denom, 3, 1)).astype(q.dtype))
        lses.append((m + jnp.log(denom))[..., 0])  # [B, K, G, blk]
    out = jnp.concatenate(outs, axis=1)  # [B, T, K, G, Dh]
    return out, jnp.concatenate(lses, axis=-1)  # lse [B, K, G, T] fp32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def block_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, block: int
) -> jax.Array:
    """Exact causal attention by query blocks; see the module docstring."""
    out, _ = _forward(q, k, v, mask, scale, block)
    return out.reshape(q.shape)


def _fwd(q, k, v, mask, scale, block):
    out, lse = _forward(q, k, v, mask, scale, block)
    return out.reshape(q.shape), (q, k, v, mask, out, lse)


def _bwd(scale, block, res, d_out):
    q, k, v, mask, out, lse = res
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)
    dog = d_out.reshape(qg.shape).astype(q.dtype)  # [B, T, K, G, Dh]
    # rowsum(dO * O) per query row: [B, K, G, T] fp32.
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog.astype(jnp.float32), out.astype(jnp.float32))
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in _blocks(t, block):
        qb, dob = qg[:, start:end], dog[:, start:end]
        s = _scores(qb, k[:, :end], mask[:, :, start:end, :end], scale)
        p = jnp.exp(s - lse[..., start:end, None])  # [B, K, G, blk, e]; 0 where masked
        dp = jnp.einsum("btkgd,bskd->bkgts", dob, v[:, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., start:end, None]) * scale).astype(q.dtype)
        dq_blocks.append(
            jnp.einsum("bkgts,bskd->btkgd", ds, k[:, :end], preferred_element_type=jnp.float32)
        )
        dk = dk.at[:, :end].add(
            jnp.einsum("bkgts,btkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
        )
        dv = dv.at[:, :end].add(
            jnp.einsum(
                "bkgts,btkgd->bskd", p.astype(v.dtype), dob, preferred_element_type=jnp.float32
            )
        )
    dq = jnp.concatenate(dq_blocks, axis=1).reshape(q.shape).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


block_causal_attention.defvjp(_fwd, _bwd)
