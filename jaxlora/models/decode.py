"""Attention of one decode step over a KV cache that does not hold the step's token yet.

Why this file exists: generation (`evaluate/generate.py`) runs the scanned decoder once per new
token. If each layer wrote its new key/value into the cache and then attended over it, the scan
would carry the whole [L, B, S, K, Dh] cache through as an input and stack the written copies as
an output: every token would copy the cache (twice), and a 135M model's step grew from ~90 ms to
~300 ms at a 1k-token prompt on a CPU. Instead a decode step only READS the cache; the layers
return their [B, 1, K, Dh] keys/values and the decoder writes all L of them after the scan, in
place in the decode loop's carry (`models/llama.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.models.attention import _NEG


def is_decode_step(t: int, segment_ids: jax.Array | None, prefix: object) -> bool:
    """A cached call is a decode step (one new token per row, attended over the cache with the
    caller's mask; no virtual tokens): the layers then return only the new keys/values."""
    return t == 1 and segment_ids is None and prefix is None


def decode_attention(q, ck, cv, k_new, v_new, mask, scale, softcap=None):
    """One decode step over a KV cache that does not hold this step's token yet.

    q [B, 1, N, Dh]; ck/cv [B, S, K, Dh] the cache before this step (read only); k_new/v_new
    [B, 1, K, Dh] this step's key/value; mask [B, 1, 1, S] the cached slots the query sees (its
    own slot is not read from the cache: the token always sees itself through k_new/v_new).

    The softmax over the S + 1 scores is the dense one (fp32 scores, probabilities cast to v's
    dtype for the PV product), split in two parts: the cached slots and the token itself.
    """
    b, t, n, dh = q.shape
    kh = ck.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)  # [B, 1, K, G, Dh]
    s_old = jnp.einsum("btkgd,bskd->bkgts", qg, ck, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("btkgd,btkd->bkgt", qg, k_new, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s_old = softcap * jnp.tanh(s_old / softcap)
        s_new = softcap * jnp.tanh(s_new / softcap)
    s_old = jnp.where(mask[:, :, None], s_old, _NEG)  # [B, K, G, 1, S]
    m = jnp.maximum(s_old.max(axis=-1), s_new)  # [B, K, G, 1]
    p_old = jnp.exp(s_old - m[..., None])
    p_new = jnp.exp(s_new - m)
    denom = p_old.sum(axis=-1) + p_new
    p_old = (p_old / denom[..., None]).astype(cv.dtype)
    p_new = (p_new / denom).astype(v_new.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", p_old, cv, preferred_element_type=jnp.float32)
    out = out + jnp.einsum("bkgt,btkd->btkgd", p_new, v_new, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, dh).astype(q.dtype)
