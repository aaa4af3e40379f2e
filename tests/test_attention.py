"""Block-causal attention (models/attention.py) equals dense masked attention: value and grads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import attention as A
from jaxlora.models.llama import attention_mask

B, T, N, K, DH = 2, 40, 4, 2, 8


def _inputs(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, N, DH), dtype)
    k = jax.random.normal(ks[1], (B, T, K, DH), dtype)
    v = jax.random.normal(ks[2], (B, T, K, DH), dtype)
    g = jax.random.normal(ks[3], (B, T, N, DH), dtype)
    # Row 0: two packed segments then padding; row 1: one segment, no padding.
    seg = jnp.asarray([[1] * 15 + [2] * 17 + [0] * 8, [1] * T], jnp.int32)
    return q, k, v, g, seg


def _dense(q, k, v, mask, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


@pytest.mark.parametrize("block,window,softcap", [(8, None, None), (7, None, None), (8, 5, None),
                                                  (8, 5, 1.5)])  # fmt: skip
def test_block_causal_matches_dense_value_and_grads(block, window, softcap):
    """Also with Gemma 2's attention soft-cap, against the dense soft-capped reference."""
    q, k, v, g, seg = _inputs()
    mask = attention_mask(seg, window)
    real = (seg != 0)[:, :, None, None]  # padding query rows: output unused, compare the rest
    scale = DH**-0.5

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v) * g, 0.0))

    def blocked(q, k, v):
        return A.block_causal_attention(q, k, v, mask, scale, block, softcap)

    def dense(q, k, v):
        if softcap is not None:
            return A._softcapped(q, k, v, mask, scale, softcap)
        return _dense(q, k, v, mask, scale)

    out_b, out_d = jax.jit(blocked)(q, k, v), jax.jit(dense)(q, k, v)
    np.testing.assert_allclose(np.where(real, out_b, 0), np.where(real, out_d, 0), atol=2e-6)
    gb = jax.jit(jax.grad(lambda *a: loss(blocked, *a), argnums=(0, 1, 2)))(q, k, v)
    gd = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(gb, gd, strict=True):
        assert float(jnp.abs(y).max()) > 0
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_bf16_block_attention_close_to_fp32_and_finite_on_padding():
    q, k, v, g, seg = _inputs()
    mask = attention_mask(seg)
    ref = _dense(q, k, v, mask, DH**-0.5)
    cast = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = jax.jit(A.block_causal_attention, static_argnums=(4, 5))(*cast, mask, DH**-0.5, 8)
    assert out.dtype == jnp.bfloat16
    real = np.asarray(seg != 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, out.astype(jnp.float32), 0), np.where(real, ref, 0),
                               atol=3e-2)  # fmt: skip
    grads = jax.jit(
        jax.grad(lambda q: jnp.sum(A.block_causal_attention(q, *cast[1:], mask, 0.3, 8)))
    )(cast[0])
    assert bool(jnp.all(jnp.isfinite(grads.astype(jnp.float32))))


def test_dispatch_uses_blocks_only_for_long_uncached_cpu_sequences(monkeypatch):
    calls = []
    monkeypatch.setattr(A, "ATTENTION_BLOCK", 8)
    real_fn = A.block_causal_attention
    monkeypatch.setattr(A, "block_causal_attention", lambda *a: calls.append(a[5]) or real_fn(*a))
    q, k, v, _, seg = _inputs()
    A.attention(q, k, v, scale=0.3, segment_ids=seg)
    assert calls == ([8] if jax.default_backend() == "cpu" else [])
    A.attention(q, k, v, scale=0.3, mask=attention_mask(seg))  # decode over a KV cache: dense
    A.attention(q[:, :15], k[:, :15], v[:, :15], scale=0.3, segment_ids=seg[:, :15])
    assert len(calls) <= 1


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_decode_attention_equals_dense_over_the_written_cache(softcap):
    """A decode step that reads the old cache and adds its own key/value separately equals dense
    attention over the cache with the token written at its slot (GQA, left padding, a slot
    that holds stale values, a sliding window), in fp32 and bf16."""
    from jaxlora.evaluate.generate import cache_mask
    from jaxlora.models.decode import decode_attention

    s, slot = 24, 17
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (B, 1, N, DH))
    ck = jax.random.normal(ks[1], (B, s, K, DH))  # slot 17 and later: stale values, never seen
    cv = jax.random.normal(ks[2], (B, s, K, DH))
    k1 = jax.random.normal(ks[3], (B, 1, K, DH))
    v1 = jax.random.normal(ks[4], (B, 1, K, DH))
    valid = (jnp.arange(s) <= slot)[None] & (jnp.arange(s)[None] >= jnp.asarray([[3], [0]]))
    pos = jnp.cumsum(valid, axis=1) - 1  # row 0: 3 slots of left padding
    q_pos = pos[:, slot][:, None]
    scale = DH**-0.5
    for window in (None, 6):
        mask = cache_mask(valid, pos, jnp.asarray([slot]), q_pos, window)  # [B, 1, 1, S]
        old = mask & (jnp.arange(s) != slot)
        for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
            args = [x.astype(dtype) for x in (q, ck, cv, k1, v1)]
            got = decode_attention(*args, old, scale, softcap)
            full_k = jax.lax.dynamic_update_slice(args[1], args[3], (0, slot, 0, 0))
            full_v = jax.lax.dynamic_update_slice(args[2], args[4], (0, slot, 0, 0))
            if softcap is None:
                want = _dense(args[0], full_k, full_v, mask, scale)
            else:
                want = A._softcapped(args[0], full_k, full_v, mask, scale, softcap)
            assert got.dtype == dtype
            np.testing.assert_allclose(
                np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
            )
