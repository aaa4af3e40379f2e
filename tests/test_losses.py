"""Tests for jaxlora.losses: chunked LM loss, masking, packing, token weighting, DPO family."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora import losses as L
from jaxlora.errors import UserError

B, T, D, V = 2, 13, 8, 50

# Jitted entry points: eager op-by-op dispatch is what makes CPU tests slow.
_lm_loss = jax.jit(L.masked_lm_loss, static_argnames=("chunk_size", "logit_softcap", "vocab_major"))
_seq_logps = jax.jit(L.sequence_logps, static_argnames=("num_segments", "chunk_size"))
_tok_logps = jax.jit(
    L.token_logprobs, static_argnames=("chunk_size", "logit_softcap", "vocab_major")
)


def _inputs(seed: int = 0, b: int = B, t: int = T, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(k[0], (b, t, D), dtype=jnp.float32).astype(dtype)  # [B, T, D]
    kernel = (0.5 * jax.random.normal(k[1], (D, V), dtype=jnp.float32)).astype(dtype)  # [D, V]
    ids = jax.random.randint(k[2], (b, t), 0, V)  # [B, T]
    return hidden, kernel, ids


def _np_logprobs(hidden, kernel, ids):
    """Plain float64 numpy reference: log_softmax(h @ W)[target]."""
    h = np.asarray(hidden, np.float64)[:, :-1]
    logits = h @ np.asarray(kernel, np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], -1)[..., 0]


# ----------------------------------------------------------------------------- token log-probs


def test_token_logprobs_matches_numpy_reference():
    hidden, kernel, ids = _inputs()
    got = _tok_logps(hidden, kernel, ids)
    assert got.shape == (B, T - 1) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_logprobs(hidden, kernel, ids), rtol=1e-5, atol=1e-5)


def test_logprobs_from_logits_equals_fused_head():
    hidden, kernel, ids = _inputs(11)
    logits = jnp.einsum("btd,dv->btv", hidden, kernel).astype(jnp.bfloat16)  # [B, T, V]
    got = L.logprobs_from_logits(logits, ids, logit_softcap=3.0)
    want = L.logprobs_from_logits(logits.astype(jnp.float32), ids, logit_softcap=3.0)
    assert got.shape == (B, T - 1) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(
        L.logprobs_from_logits(jnp.einsum("btd,dv->btv", hidden, kernel), ids),
        _tok_logps(hidden, kernel, ids),
        atol=1e-5,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 64])
def test_chunked_token_logprobs_equal_unchunked(chunk_size):
    hidden, kernel, ids = _inputs(1)
    full = _tok_logps(hidden, kernel, ids)
    chunked = _tok_logps(hidden, kernel, ids, chunk_size=chunk_size)
    np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size,softcap", [(3, None), (4, None), (5, 7.5), (4, 1.5)])
def test_chunked_loss_value_and_grad_equal_unchunked(chunk_size, softcap):
    hidden, kernel, ids = _inputs(2)
    mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, (B, T)), jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 6 + [0] * 2, [1] * 9 + [2] * 4], jnp.int32)

    def loss(h, w, cs):
        s, n = _lm_loss(h, w, ids, mask, seg, chunk_size=cs, logit_softcap=softcap)
        return s / n

    def plain(h, w):  # autodiff of whole-batch fp32 log-softmax: the reference
        logits = jnp.einsum("btd,dv->btv", h[:, :-1], w)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        logps = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
        tw = L.target_weights(mask, seg)
        return -jnp.sum(logps * tw) / jnp.sum(tw)

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, (gh0, gw0) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(hidden, kernel)
    v1, (gh1, gw1) = vg(hidden, kernel, chunk_size)
    vn, (ghn, gwn) = vg(hidden, kernel, None)  # the default chunking
    np.testing.assert_allclose(vn, v0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ghn, gh0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gwn, gw0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gh1, gh0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw1, gw0, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gw0).sum()) > 0  # the comparison is not between two zero gradients


@pytest.mark.parametrize("chunk_size,softcap", [(None, None), (4, None), (5, 7.5)])
def test_vocab_major_head_equals_the_transposed_kernel(chunk_size, softcap):
    """A tied embedding is passed as stored ([V, D], `vocab_major`), not transposed: loss,
    log-probs, d/dh and d/dW (full fine-tuning trains the tied embedding) equal the [D, V]
    path's, d/dW transposed."""
    hidden, kernel, ids = _inputs(5)
    emb = kernel.T  # [V, D]
    mask = jnp.asarray(np.random.default_rng(1).integers(0, 2, (B, T)), jnp.int32)
    kw = dict(chunk_size=chunk_size, logit_softcap=softcap)

    def loss(h, w, vm):
        s, n = _lm_loss(h, w, ids, mask, vocab_major=vm, **kw)
        return s / n

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, (gh0, gw0) = vg(hidden, kernel, False)
    v1, (gh1, gw1) = vg(hidden, emb, True)
    assert gw1.shape == (V, D)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(gh1, gh0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw1, gw0.T, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(gw0).sum()) > 0
    want = _tok_logps(hidden, kernel, ids, **kw)
    got = _tok_logps(hidden, emb, ids, vocab_major=True, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    g_tok = jax.grad(lambda w: _tok_logps(hidden, w, ids, vocab_major=True, **kw).sum())(emb)
    g_ref = jax.grad(lambda w: _tok_logps(hidden, w, ids, **kw).sum())(kernel)
    np.testing.assert_allclose(g_tok, g_ref.T, rtol=1e-5, atol=1e-6)


def test_softcap_applies_tanh_before_softmax():
    hidden, kernel, ids = _inputs(3)
    c = 2.0
    logits = jnp.einsum("btd,dv->btv", hidden[:, :-1], kernel)
    capped = c * jnp.tanh(logits / c)
    ref = jnp.take_along_axis(jax.nn.log_softmax(capped), ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(_tok_logps(hidden, kernel, ids, logit_softcap=c), ref, atol=1e-5)


def test_bf16_inputs_give_fp32_logprobs_close_to_fp32_math():
    hidden, kernel, ids = _inputs(4, dtype=jnp.bfloat16)
    got = _tok_logps(hidden, kernel, ids, chunk_size=4)
    assert got.dtype == jnp.float32
    # Same bf16 values, exact fp32/fp64 arithmetic: only accumulation order differs.
    ref = _np_logprobs(hidden.astype(jnp.float32), kernel.astype(jnp.float32), ids)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_fused_loss_in_bf16_matches_fp32_math_on_the_same_values():
    """bf16 hidden/head (the training dtypes): loss and d/dh of the fused head + CE agree with
    fp32 math on the same bf16 values (dlogits are rounded to bf16 for the dX matmul)."""
    hidden, kernel, ids = _inputs(6, dtype=jnp.bfloat16)
    mask = jnp.ones(ids.shape, jnp.int32)

    def loss(h, w):
        s, n = _lm_loss(h, w, ids, mask, chunk_size=4)
        return s / n

    v16, g16 = jax.jit(jax.value_and_grad(loss))(hidden, kernel)
    v32, g32 = jax.jit(jax.value_and_grad(loss))(
        hidden.astype(jnp.float32), kernel.astype(jnp.float32)
    )
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(v16, v32, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g16, np.float32), g32, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_grad_never_materialises_full_logits(softcap):
    """Also with a final-logit soft-cap (Gemma 2): the fused loss keeps memory flat."""
    b, t, v = 2, 129, 4096
    k = jax.random.split(jax.random.PRNGKey(5), 3)
    hidden = jax.random.normal(k[0], (b, t, D))
    kernel = jax.random.normal(k[1], (D, v))
    ids = jax.random.randint(k[2], (b, t), 0, v)
    mask = jnp.ones((b, t), jnp.int32)
    full_logits_bytes = b * (t - 1) * v * 4

    def temp_bytes(cs):
        g = jax.grad(
            lambda h, w: _lm_loss(h, w, ids, mask, chunk_size=cs, logit_softcap=softcap)[0],
            (0, 1),
        )
        stats = jax.jit(g).lower(hidden, kernel).compile().memory_analysis()
        if stats is None:
            pytest.skip("backend reports no memory analysis")
        return stats.temp_size_in_bytes

    assert temp_bytes(None) >= full_logits_bytes  # sanity: the plain version does hold them
    assert temp_bytes(8) < full_logits_bytes / 2


def _eqns(jaxpr):
    """Every equation of a jaxpr, into scans / custom-vjp bodies."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _eqns(inner if hasattr(inner, "eqns") else sub)


def _count_eqns(jaxpr, name: str) -> int:
    """Equations called `name` in a jaxpr, counted into scans / custom-vjp bodies."""
    return sum(eqn.primitive.name == name for eqn in _eqns(jaxpr))


def test_fused_loss_without_grad_computes_no_backward():
    """Eval (no autodiff) traces the fused loss forward only: one matmul (the head), not the
    d(loss)/dh product the training forward computes alongside."""
    hidden, kernel, ids = _inputs()
    mask = jnp.ones(ids.shape, jnp.int32)

    def loss(h, w):
        return L.masked_lm_loss(h, w, ids, mask, chunk_size=4)[0]

    fwd = jax.make_jaxpr(loss)(hidden, kernel).jaxpr
    assert _count_eqns(fwd, "dot_general") == 1  # logits = h @ W
    train = jax.make_jaxpr(jax.value_and_grad(loss))(hidden, kernel).jaxpr
    assert _count_eqns(train, "dot_general") >= 2  # + dlogits @ W^T in the training forward


def test_chunks_pad_less_than_one_position_each():
    """The fused loss splits N positions into the fewest chunks of at most `chunk_size`, then
    equal ones. Before, N was padded to whole chunks of `chunk_size`: a 64-token batch under the
    CPU default (~2,000 positions) ran the head matmuls over 2,097 positions, 33x the work."""
    from jaxlora.losses.fused_ce import chunk_layout

    assert chunk_layout(64, 2097) == (1, 64)
    assert chunk_layout(256, 42) == (7, 37)  # the SmolLM2 bench shape: pad 3, was 38
    assert chunk_layout(512, 128) == (4, 128)
    for n in range(1, 200):
        for cap in (1, 3, 7, 42, 64, 1000):
            chunks, pos = chunk_layout(n, cap)
            assert pos <= cap and chunks == -(-n // cap) and 0 <= chunks * pos - n < chunks
    # In the traced training loss: the head's dots cover the 12 real positions, no padding.
    hidden, kernel, ids = _inputs()
    mask = jnp.ones(ids.shape, jnp.int32)

    def loss(h, w):
        return L.masked_lm_loss(h, w, ids, mask, chunk_size=2097)[0]

    train = jax.make_jaxpr(jax.value_and_grad(loss, (0, 1)))(hidden, kernel).jaxpr
    shapes = [e.outvars[0].aval.shape for e in _eqns(train) if e.primitive.name == "dot_general"]
    assert (B, T - 1, V) in shapes and not [x for x in shapes if 2097 in x], shapes


def test_bad_chunk_size_is_user_error():
    hidden, kernel, ids = _inputs()
    with pytest.raises(UserError, match="chunk_size"):
        _tok_logps(hidden, kernel, ids, chunk_size=0)


# ----------------------------------------------------------------------------- masking / packing


def test_target_weights_shift_mask_and_cut_segment_boundaries():
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1, 0]])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
    # targets are tokens 1..6; token 3 starts segment 2, token 5 is padding, token 6 mask 0
    np.testing.assert_array_equal(L.target_weights(mask), [[1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(L.target_weights(mask, seg), [[1, 1, 0, 1, 0, 0]])


def test_masked_lm_loss_is_weighted_sum_and_ignores_masked_targets():
    hidden, kernel, ids = _inputs(6)
    mask = jnp.asarray([[0] * 4 + [1] * 9, [0] * 7 + [1] * 4 + [0] * 2], jnp.int32)
    s, n = _lm_loss(hidden, kernel, ids, mask)
    ref = -(_np_logprobs(hidden, kernel, ids) * np.asarray(mask)[:, 1:]).sum()
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    assert float(n) == 9 + 4
    # Changing a masked-out target (and the hidden state predicting it) changes nothing.
    ids2 = ids.at[0, 2].set((ids[0, 2] + 1) % V).at[1, 12].set((ids[1, 12] + 3) % V)
    hidden2 = hidden.at[0, 1].set(100.0).at[1, 11].set(-7.0)
    s2, n2 = _lm_loss(hidden2, kernel, ids2, mask)
    np.testing.assert_allclose(s2, s, rtol=1e-6)
    assert float(n2) == float(n)
    # ...and its gradient there is exactly zero.
    gh = jax.grad(lambda h: _lm_loss(h, kernel, ids, mask)[0])(hidden)
    assert float(jnp.abs(gh[0, :3]).max()) == 0.0 and float(jnp.abs(gh[0, 3:12]).max()) > 0


def test_packed_row_loss_equals_separate_samples():
    ha, ka, ia = _inputs(7, b=1, t=6)
    hb, _, ib = _inputs(8, b=1, t=5)
    ma = jnp.asarray([[0, 0, 1, 1, 1, 1]])
    mb = jnp.asarray([[0, 1, 1, 1, 1]])
    pad = 3
    hidden = jnp.concatenate([ha, hb, jnp.zeros((1, pad, D))], axis=1)  # [1, 14, D]
    ids = jnp.concatenate([ia, ib, jnp.zeros((1, pad), jnp.int32)], axis=1)
    mask = jnp.concatenate([ma, mb, jnp.ones((1, pad), jnp.int32)], axis=1)  # pad mask 1 on purpose
    seg = jnp.asarray([[1] * 6 + [2] * 5 + [0] * pad])
    sa, na = _lm_loss(ha, ka, ia, ma)
    sb, nb = _lm_loss(hb, ka, ib, mb)
    for cs in (None, 4):
        sp, n_p = _lm_loss(hidden, ka, ids, mask, seg, chunk_size=cs)
        np.testing.assert_allclose(sp, sa + sb, rtol=1e-6)
        assert float(n_p) == float(na + nb) == 4 + 4


def test_token_weighted_half_batches_sum_to_full_batch():
    hidden, kernel, ids = _inputs(9, b=4)
    mask = jnp.asarray(np.random.default_rng(1).integers(0, 2, (4, T)), jnp.int32)

    def loss_sum(h, w, i, m):
        return _lm_loss(h, w, i, m, chunk_size=5)

    s_full, n_full = loss_sum(hidden, kernel, ids, mask)
    s1, n1 = loss_sum(hidden[:2], kernel, ids[:2], mask[:2])
    s2, n2 = loss_sum(hidden[2:], kernel, ids[2:], mask[2:])
    np.testing.assert_allclose(s1 + s2, s_full, rtol=1e-6)
    assert float(n1 + n2) == float(n_full)
    # The trainer's accumulated gradient: sum of micro-batch gradients / global token count.
    g_full = jax.grad(lambda w: loss_sum(hidden, w, ids, mask)[0] / n_full)(kernel)
    g1 = jax.grad(lambda w: loss_sum(hidden[:2], w, ids[:2], mask[:2])[0])(kernel)
    g2 = jax.grad(lambda w: loss_sum(hidden[2:], w, ids[2:], mask[2:])[0])(kernel)
    np.testing.assert_allclose((g1 + g2) / (n1 + n2), g_full, rtol=1e-5, atol=1e-7)


def test_per_segment_logps_equal_per_row_logps_of_separate_samples():
    samples = [_inputs(10 + i, b=1, t=t) for i, t in enumerate([5, 4, 6])]
    kernel = samples[0][1]
    masks = [jnp.asarray([[0] * 2 + [1] * (h.shape[1] - 2)]) for h, _, _ in samples]
    # Two packed rows: [s0, s1, pad] and [s2, pad]; S = 3 columns (row 2 has one empty segment).
    pad0, pad1 = 2, 5
    row0_h = jnp.concatenate([samples[0][0], samples[1][0], jnp.zeros((1, pad0, D))], 1)
    row1_h = jnp.concatenate([samples[2][0], jnp.zeros((1, pad1, D))], 1)
    hidden = jnp.concatenate([row0_h, row1_h], 0)  # [2, 11, D]
    z0, z1 = jnp.zeros((1, pad0), jnp.int32), jnp.zeros((1, pad1), jnp.int32)
    ids = jnp.concatenate(
        [
            jnp.concatenate([samples[0][2], samples[1][2], z0], 1),
            jnp.concatenate([samples[2][2], z1], 1),
        ]
    )
    mask = jnp.concatenate(
        [jnp.concatenate([masks[0], masks[1], z0], 1), jnp.concatenate([masks[2], z1], 1)]
    )
    seg = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 2, [1] * 6 + [0] * 5])
    logps, counts = _seq_logps(hidden, kernel, ids, mask, seg, num_segments=3, chunk_size=3)
    assert logps.shape == counts.shape == (2, 3)

    sep = [_seq_logps(h, kernel, i, m) for (h, _, i), m in zip(samples, masks, strict=True)]
    want_logps = np.array([[sep[0][0][0], sep[1][0][0], 0.0], [sep[2][0][0], 0.0, 0.0]])
    want_counts = np.array([[3, 2, 0], [4, 0, 0]], np.float32)
    np.testing.assert_allclose(logps, want_logps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(counts, want_counts)
    # Per-row reduction of the same packed batch = sum over its segments.
    row_logps, row_counts = _seq_logps(hidden, kernel, ids, mask, seg)
    np.testing.assert_allclose(row_logps, logps.sum(-1), rtol=1e-6)
    np.testing.assert_array_equal(row_counts, [5, 4])


def test_num_segments_without_segment_ids_is_user_error():
    with pytest.raises(UserError, match="segment_ids"):
        L.reduce_logps(jnp.zeros((1, 3)), jnp.ones((1, 4)), num_segments=2)


# ----------------------------------------------------------------------------- DPO family


def _pairs(seed: int, n: int = 16):
    rng = np.random.default_rng(seed)
    lp = [jnp.asarray(-rng.uniform(5, 60, n), jnp.float32) for _ in range(4)]
    lengths = [jnp.asarray(rng.integers(1, 40, n), jnp.int32) for _ in range(2)]
    return lp, lengths


def _logsig(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


@pytest.mark.parametrize("loss_type", L.DPO_LOSS_TYPES)
def test_dpo_zero_margin(loss_type):
    x = jnp.asarray([-12.0, -3.5])
    ones = jnp.ones(2)
    losses, cr, rr = L.dpo_loss(
        x, x, x, x, beta=0.1, loss_type=loss_type, chosen_lengths=ones, rejected_lengths=ones
    )
    want = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / 0.2) ** 2, "robust": math.log(2)}
    np.testing.assert_allclose(losses, [want[loss_type]] * 2, rtol=1e-6)
    np.testing.assert_array_equal(cr, 0.0)
    np.testing.assert_array_equal(rr, 0.0)


def test_dpo_formulas_by_hand():
    (pc, pr, rc, rr), (lc, lr) = _pairs(0)
    beta, eps = 0.25, 0.2
    d = (np.float64(pc) - rc) - (np.float64(pr) - rr)
    got = {t: L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=t)[0] for t in ("sigmoid", "hinge")}
    np.testing.assert_allclose(got["sigmoid"], -_logsig(beta * d), rtol=1e-5)
    np.testing.assert_allclose(got["hinge"], np.maximum(0, 1 - beta * d), rtol=1e-5, atol=1e-6)
    cdpo = L.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0]
    np.testing.assert_allclose(
        cdpo, -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d), rtol=1e-5
    )
    robust = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)[0]
    np.testing.assert_allclose(
        robust,
        (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps),
        rtol=1e-5,
    )
    ipo = L.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr
    )[0]
    ipo_d = (np.float64(pc) - rc) / np.asarray(lc) - (np.float64(pr) - rr) / np.asarray(lr)
    np.testing.assert_allclose(ipo, (ipo_d - 1 / (2 * beta)) ** 2, rtol=1e-5)
    # robust with ε = 0 is plain DPO
    np.testing.assert_allclose(
        L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust")[0], got["sigmoid"], rtol=1e-6
    )


def test_dpo_rewards_are_detached_and_loss_is_differentiable():
    (pc, pr, rc, rr), _ = _pairs(1, n=4)

    def f(pc, pr):
        losses, cr, rrw = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
        return losses.mean(), (cr.sum() + rrw.sum())

    g_loss = jax.grad(lambda a, b: f(a, b)[0], (0, 1))(pc, pr)
    g_rew = jax.grad(lambda a, b: f(a, b)[1], (0, 1))(pc, pr)
    assert float(jnp.abs(g_loss[0]).min()) > 0 and float(g_loss[0].sum()) < 0  # raise chosen
    assert float(g_loss[1].sum()) > 0  # lower rejected
    np.testing.assert_array_equal(g_rew[0], 0.0)
    np.testing.assert_array_equal(g_rew[1], 0.0)
    _, cr, _ = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    np.testing.assert_allclose(cr, 0.1 * (pc - rc), rtol=1e-6)


def test_dpo_works_under_jit_and_on_2d_inputs():
    (pc, pr, rc, rr), _ = _pairs(2, n=6)
    shaped = [x.reshape(2, 3) for x in (pc, pr, rc, rr)]
    f = jax.jit(lambda *a: L.dpo_loss(*a, beta=0.1, loss_type="hinge"))
    np.testing.assert_allclose(
        f(*shaped)[0].reshape(-1), L.dpo_loss(pc, pr, rc, rr, loss_type="hinge")[0], rtol=1e-6
    )


def test_dpo_bad_options_are_user_errors():
    x = jnp.zeros(2)
    with pytest.raises(UserError, match="sigmoid, hinge, ipo, robust") as err:
        L.dpo_loss(x, x, x, x, loss_type="sigmod")
    assert "did you mean `sigmoid`" in str(err.value)
    with pytest.raises(UserError, match="chosen_lengths"):
        L.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(UserError, match=r"\[0, 0.5\)"):
        L.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(UserError, match="pref_beta"):
        L.dpo_loss(x, x, x, x, beta=0.0)


def _np_orpo(pc, pr, lc, lr, beta):
    # Published form (ORPO paper Eq. 4, 7): odds(y) = P/(1-P) with P the per-token mean probability.
    p_c = np.exp(np.float64(pc) / np.asarray(lc))
    p_r = np.exp(np.float64(pr) / np.asarray(lr))
    log_or = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    return -beta * _logsig(log_or)


def test_orpo_matches_published_formula_and_is_stable():
    (pc, pr, _, _), (lc, lr) = _pairs(3)
    losses, cr, rr = L.orpo_loss(pc, pr, lc, lr, beta=0.1)
    np.testing.assert_allclose(losses, _np_orpo(pc, pr, lc, lr, 0.1), rtol=1e-5)
    np.testing.assert_allclose(cr, 0.1 * pc / lc, rtol=1e-6)
    np.testing.assert_allclose(rr, 0.1 * pr / lr, rtol=1e-6)
    assert bool((losses >= 0).all())
    # Per-token means near 0 (p -> 1) and very negative ones: finite values and gradients.
    extreme_c = jnp.asarray([-1e-4, -60.0, -0.69, -0.7])
    extreme_r = jnp.asarray([-80.0, -1e-3, -0.7, -0.69])
    ones = jnp.ones(4)
    val, grads = jax.value_and_grad(
        lambda a, b: L.orpo_loss(a, b, ones, ones, beta=0.5)[0].sum(), (0, 1)
    )(extreme_c, extreme_r)
    assert bool(jnp.isfinite(val)) and all(bool(jnp.isfinite(g).all()) for g in grads)
    # p̄ = 1 exactly (mean log-prob 0.0): no NaN leaks into the step.
    val0, grads0 = jax.value_and_grad(
        lambda a: L.orpo_loss(a, extreme_r[:2], ones[:2], ones[:2], beta=0.5)[0].sum()
    )(jnp.zeros(2))
    assert bool(jnp.isfinite(val0)) and bool(jnp.isfinite(grads0).all())
    np.testing.assert_allclose(
        L.orpo_loss(extreme_c, extreme_r, ones, ones, beta=0.5)[0],
        _np_orpo(extreme_c, extreme_r, ones, ones, 0.5),
        rtol=1e-4,
        atol=1e-6,
    )


def test_simpo_matches_published_formula():
    (pc, pr, _, _), (lc, lr) = _pairs(4)
    beta, gamma = 2.0, 0.5
    losses, cr, rr = L.simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma)
    # SimPO paper Eq. 6: -logσ(β/|yw|·log πw - β/|yl|·log πl - γ)
    z = beta * np.float64(pc) / np.asarray(lc) - beta * np.float64(pr) / np.asarray(lr) - gamma
    np.testing.assert_allclose(losses, -_logsig(z), rtol=1e-5)
    np.testing.assert_allclose(cr, beta * pc / lc, rtol=1e-6)
    eps = 0.1
    smoothed = L.simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma, label_smoothing=eps)[0]
    np.testing.assert_allclose(smoothed, -(1 - eps) * _logsig(z) - eps * _logsig(-z), rtol=1e-5)


def test_preference_metrics_batch_means_with_mask():
    cr = jnp.asarray([0.5, -0.2, 0.1, 9.0])
    rr = jnp.asarray([0.1, 0.3, 0.1, -9.0])
    lc = jnp.asarray([-10.0, -20.0, -30.0, 0.0])
    lr = jnp.asarray([-11.0, -21.0, -31.0, 0.0])
    m = L.preference_metrics(cr, rr, lc, lr)
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)  # ties are not accurate
    np.testing.assert_allclose(m["rewards/margins"], np.mean(cr - rr), rtol=1e-6)
    masked = L.preference_metrics(cr, rr, lc, lr, mask=jnp.asarray([1, 1, 1, 0]))
    np.testing.assert_allclose(masked["rewards/accuracies"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(masked["rewards/chosen"], 0.4 / 3, rtol=1e-6)
    np.testing.assert_allclose(masked["logps/rejected"], -21.0, rtol=1e-6)
