"""Fused LM head + cross-entropy: the loss and its gradient in one chunked forward pass.

Why this file exists: the plain LM loss materialises [tokens, V] fp32 logits and autodiff keeps
them (or, chunked, recomputes them) for the backward pass. Here each chunk's logits give the loss
and, right away, d(loss)/d(logits) = w * (softmax - onehot), whose product with the head is
d(loss)/d(hidden); the backward pass only scales that saved gradient. Per step that saves one
[tokens, V] pass and all logits memory (1.09x on the CPU benchmark, benchmarks/RESULTS.md).
Value and gradient equal the plain computation (tests/test_losses.py).

The head comes as stored (`vocab_major`: a tied [V, D] embedding, else a [D, V] kernel) and
every product contracts over D in that orientation: transposing the embedding inside the step
made XLA:CPU copy the whole [V, D] matrix twice per step.

A final-logit soft-cap (Gemma 2: l = c * tanh(z / c) of the raw logits z) is elementwise, so it
fuses too: per chunk d(loss)/dz = d(loss)/dl * (1 - (l / c)^2), and memory stays flat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError

Array = jax.Array


def head_subscript(vocab_major: bool) -> str:
    """einsum letters of the LM head as stored: "vd" for a tied [V, D] embedding, "dv" for a
    [D, V] kernel (see `models.llama.head_weight`)."""
    return "vd" if vocab_major else "dv"


# fp32 logits per chunk: 64 MiB on CPU (512 tokens at V = 32000: big enough for full-speed head
# dots, small enough to stay out of the way; benchmarks/RESULTS.md) and ~512 MiB on accelerators.
FUSED_CE_BUDGET_BYTES = {"cpu": 64 * 2**20}
FUSED_CE_DEFAULT_BUDGET = 512 * 2**20


def chunk_layout(n: int, positions: int) -> tuple[int, int]:
    """(chunks, positions per chunk) for N sequence positions and at most `positions` per chunk:
    the fewest chunks, then equal ones, so padding stays below one position per chunk. (Padding
    N up to whole chunks of `positions` cost up to 33x the head FLOPs when N is short: the CPU
    logits budget allows ~2,000 positions at batch 8 and a 1k vocabulary; at the SmolLM2-135M
    bench shape, 256 positions in chunks of 42 padded 15%.)"""
    n_chunks = -(-n // max(1, min(positions, n)))
    return n_chunks, -(-n // n_chunks)


def _fused_ce_chunks(
    h,
    w,
    targets,
    weights,
    positions: int,
    need_dh: bool,
    need_dw: bool,
    softcap=None,
    vocab_major: bool = False,
):
    """Loss sum and d(loss)/dh (+ d(loss)/dW) computed chunk by chunk in ONE forward pass.

    h [B, N, D] (position t predicts targets[:, t]), w [D, V] or, `vocab_major`, [V, D];
    targets/weights [B, N]; chunks of `positions` along the sequence keep a sharded batch axis
    sharded. Per chunk the [B, pos, V] fp32 logits give the loss and, right away, dlogits =
    w_t * (softmax - onehot), whose product with the head is d(loss)/dh: logits are never
    stored for a backward pass nor recomputed.
    need_dh=False (no gradient wanted: eval, reference log-probs) computes the loss alone; dh
    is then None.
    """
    b, n, d = h.shape
    hw = head_subscript(vocab_major)  # "dv" or "vd": w as stored, never transposed
    n_chunks, positions = chunk_layout(n, positions)
    pad = n_chunks * positions - n

    def split(x):  # [B, N, ...] -> [C, B, pos, ...]; padded positions weigh 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n_chunks, positions, *x.shape[2:]).swapaxes(0, 1)

    def body(dw_acc, xs):
        h_c, t_c, w_c = xs  # [B, pos, D], [B, pos], [B, pos]
        logits = jnp.einsum(f"bpd,{hw}->bpv", h_c, w, preferred_element_type=jnp.float32)
        if softcap is not None:  # [B, pos, V] capped logits
            logits = softcap * jnp.tanh(logits / softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, pos]
        tgt = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        loss = jnp.sum(jnp.where(w_c > 0, (lse - tgt) * w_c, 0.0))
        if not need_dh:  # forward only: no softmax, no [B, pos, V] x [V, D] product
            return dw_acc, (loss, None)
        p = jnp.exp(logits - lse[..., None])
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        # bf16 x bf16 (fp32 accumulate) for the dX matmul, as the forward; dlogits are O(1/V).
        dlogits = (p - onehot) * w_c[..., None]  # d(loss)/d(capped logits)
        if softcap is not None:  # chain rule through c * tanh(z / c): 1 - tanh^2
            dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
        dlogits = dlogits.astype(w.dtype)  # [B, pos, V]
        dh = jnp.einsum(f"bpv,{hw}->bpd", dlogits, w, preferred_element_type=jnp.float32)
        if need_dw:  # only when the head is trained (full fine-tuning)
            dw_acc = dw_acc + jnp.einsum(
                f"bpd,bpv->{hw}", h_c, dlogits, preferred_element_type=jnp.float32
            )
        return dw_acc, (loss, dh.astype(h.dtype))

    dw0 = jnp.zeros(w.shape, jnp.float32) if need_dw else jnp.zeros((), jnp.float32)
    dw, (losses, dh) = jax.lax.scan(body, dw0, (split(h), split(targets), split(weights)))
    if need_dh:
        dh = dh.swapaxes(0, 1).reshape(b, n_chunks * positions, d)[:, :n]
    return jnp.sum(losses), dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def fused_ce_sum(
    h: Array,
    w: Array,
    targets: Array,
    weights: Array,
    positions: int,
    softcap: float | None = None,
    vocab_major: bool = False,
) -> Array:
    """sum_t weights_t * NLL(targets_t | softcap(h_t @ w)); the gradient is computed in the
    forward. `softcap` (static): logits c * tanh(z / c) first (Gemma 2), None for none;
    `vocab_major` (static): w is [V, D] (a tied embedding as stored), else [D, V].

    Called outside autodiff (eval, DPO reference log-probs) this body runs, which computes the
    loss alone; under `jax.grad` the forward rule below also computes d(loss)/dh."""
    loss, _, _ = _fused_ce_chunks(
        h, w, targets, weights, positions, False, False, softcap, vocab_major
    )
    return loss


def _fused_ce_fwd(h, w, targets, weights, positions, softcap, vocab_major):
    # symbolic_zeros: `w.perturbed` says whether the head needs a gradient (full FT) or not.
    need_dw = bool(w.perturbed)
    loss, dh, dw = _fused_ce_chunks(
        h.value,
        w.value,
        targets.value,
        weights.value,
        positions,
        True,
        need_dw,
        softcap,
        vocab_major,
    )
    return loss, (dh, dw if need_dw else None, targets.value, weights.value, w.value)


def _fused_ce_bwd(positions, softcap, vocab_major, res, g):
    dh, dw, targets, weights, w = res
    g = jnp.asarray(g, jnp.float32)
    dh = (dh.astype(jnp.float32) * g).astype(dh.dtype)
    dw = jnp.zeros_like(w) if dw is None else (dw * g).astype(w.dtype)
    return dh, dw, np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights)


fused_ce_sum.defvjp(_fused_ce_fwd, _fused_ce_bwd, symbolic_zeros=True)


def fused_ce_positions(batch: int, vocab: int, chunk_size: int | None) -> int:
    """Sequence positions per fused-CE chunk: `chunk_size`, else the backend's logits budget."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise UserError(f"loss chunk_size must be a positive integer, got {chunk_size}")
        return int(chunk_size)
    budget = FUSED_CE_BUDGET_BYTES.get(jax.default_backend(), FUSED_CE_DEFAULT_BUDGET)
    return max(1, budget // (batch * vocab * 4))
