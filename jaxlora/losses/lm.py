"""Causal-LM losses: masked token cross entropy (optionally chunked / fused with the head).

Why this file exists: every training stage ends in pure functions over arrays; the LM ones (SFT,
pretraining, and the per-sequence log-probs that DPO/KTO compare) live here, the preference
formulas in `jaxlora.losses.preference`. They take final hidden states and the LM-head kernel (not
modules), so the trainer can fuse the head with the loss and never build `[tokens, vocab]` logits
at once (`jaxlora.losses.fused_ce`).

Label convention (shared with the data pipeline): `loss_mask[b, t] == 1` means token `t` is a
target. Position `t` predicts `input_ids[t + 1]`, so token log-probs are `[B, T-1]` and are
weighted by `loss_mask[:, 1:]` (and, for packed rows, only when token `t + 1` is in the same
non-padding segment as token `t`).

LM losses return SUMS plus token counts, never means: the trainer divides the summed loss of all
micro-batches by the global token count, so k accumulated micro-batches equal one big batch.
All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError
from jaxlora.losses.fused_ce import (
    chunk_layout,
    fused_ce_positions,
    fused_ce_sum,
    head_subscript,
)

Array = jax.Array


def _chunk_logprobs(
    hidden: Array,
    kernel: Array,
    targets: Array,
    logit_softcap: float | None,
    vocab_major: bool = False,
) -> Array:
    """log p(targets) for one block of tokens. hidden [..., D], targets [...] -> [...] fp32;
    kernel [D, V] or, `vocab_major`, [V, D] (contracted as stored, never transposed)."""
    # Mixed dtypes promote (bf16 hidden x fp32 kernel multiplies in fp32); callers wanting the
    # fast bf16 path cast the kernel to the compute dtype first.
    dtype = jnp.promote_types(hidden.dtype, kernel.dtype)
    # bf16 x bf16 products accumulate in fp32 and the logits stay fp32 from here on.
    logits = jnp.einsum(
        f"...d,{head_subscript(vocab_major)}->...v",
        hidden.astype(dtype),
        kernel.astype(dtype),
        preferred_element_type=jnp.float32,
    )  # [..., V] fp32
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)  # max-subtracted, stable
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - lse


def logprobs_from_logits(
    logits: Array, input_ids: Array, *, logit_softcap: float | None = None
) -> Array:
    """[B, T, V] logits (any float dtype) + [B, T] ids -> [B, T-1] fp32 log p(input_ids[:, t+1]).

    For callers that already hold full logits (eval, `Model.logits`); training uses
    `token_logprobs`, which never builds them.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    targets = input_ids[:, 1:].astype(jnp.int32)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse


def token_logprobs(
    hidden: Array,
    lm_head_kernel: Array,
    input_ids: Array,
    *,
    chunk_size: int | None = None,
    logit_softcap: float | None = None,
    vocab_major: bool = False,
) -> Array:
    """Per-token log p(input_ids[:, t+1] | tokens <= t) from final hidden states.

    hidden: [B, T, D] (bf16 or fp32), lm_head_kernel: [D, V], or [V, D] with `vocab_major` (a
    tied embedding as stored: `models.llama.head_weight`), input_ids: [B, T] int. Returns
    [B, T-1] fp32.

    `chunk_size` (positions along the sequence axis) computes the head + log-softmax in chunks of
    `[B, chunk_size, V]` logits under `lax.scan`, each chunk under `jax.checkpoint` so the backward
    pass recomputes that chunk's logits instead of storing them: peak memory is one chunk's logits,
    not `[B, T-1, V]`. Chunks run along time (not over flattened B*T tokens) so a batch axis sharded
    over devices stays sharded inside every chunk. Value and gradient equal the unchunked path.
    `logit_softcap` applies Gemma-2 style `c * tanh(logits / c)` before the softmax.
    `chunk_size`, `logit_softcap` and `vocab_major` are static Python values (mark them static
    under `jit`).
    """
    h = hidden[:, :-1]  # [B, T-1, D]: position t predicts token t+1
    targets = input_ids[:, 1:].astype(jnp.int32)  # [B, T-1]
    n = h.shape[1]
    if chunk_size is None or chunk_size >= n:
        return _chunk_logprobs(h, lm_head_kernel, targets, logit_softcap, vocab_major)
    if chunk_size < 1:
        raise UserError(f"loss chunk_size must be a positive integer, got {chunk_size}")

    n_chunks, chunk_size = chunk_layout(n, chunk_size)  # equal chunks, least padding
    pad = n_chunks * chunk_size - n
    # Padded positions (zeros hidden, target 0) give finite log-probs that are sliced off below.
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    b, d = h.shape[0], h.shape[2]
    h_chunks = h.reshape(b, n_chunks, chunk_size, d).swapaxes(0, 1)  # [C, B, chunk, D]
    t_chunks = targets.reshape(b, n_chunks, chunk_size).swapaxes(0, 1)  # [C, B, chunk]

    @jax.checkpoint  # backward recomputes this chunk's [B, chunk, V] logits
    def one_chunk(kernel: Array, h_c: Array, t_c: Array) -> Array:
        return _chunk_logprobs(h_c, kernel, t_c, logit_softcap, vocab_major)

    def body(carry: None, xs: tuple[Array, Array]) -> tuple[None, Array]:
        h_c, t_c = xs
        return carry, one_chunk(lm_head_kernel, h_c, t_c)

    _, out = jax.lax.scan(body, None, (h_chunks, t_chunks))  # [C, B, chunk]
    return out.swapaxes(0, 1).reshape(b, n_chunks * chunk_size)[:, :n]


def target_weights(loss_mask: Array, segment_ids: Array | None = None) -> Array:
    """[B, T] mask (+ optional [B, T] segment ids) -> [B, T-1] fp32 weights of the shifted targets.

    A target counts when `loss_mask[:, t+1]` is set and, for packed rows, token t+1 sits in the
    same non-padding segment as token t (no prediction across a sample boundary).
    """
    w = loss_mask[:, 1:] > 0
    if segment_ids is not None:
        nxt, cur = segment_ids[:, 1:], segment_ids[:, :-1]
        w = w & (nxt == cur) & (nxt > 0)
    return w.astype(jnp.float32)


def masked_lm_loss(
    hidden: Array,
    lm_head_kernel: Array,
    input_ids: Array,
    loss_mask: Array,
    segment_ids: Array | None = None,
    *,
    chunk_size: int | None = None,
    logit_softcap: float | None = None,
    vocab_major: bool = False,
) -> tuple[Array, Array]:
    """Token-weighted causal-LM loss: (sum of target-token NLL, target-token count), fp32 scalars.

    Divide the sums over all micro-batches (and devices) by the total count for the mean loss.
    This is the fused head + cross-entropy (`fused_ce_sum`, the soft-cap included): value and
    gradient equal the plain computation, no [tokens, V] logits are kept for the backward pass.
    lm_head_kernel: [D, V], or [V, D] with `vocab_major` (`models.llama.head_weight`).
    """
    w = target_weights(loss_mask, segment_ids)  # [B, T-1]
    dtype = jnp.promote_types(hidden.dtype, lm_head_kernel.dtype)
    vocab = lm_head_kernel.shape[0 if vocab_major else 1]
    positions = fused_ce_positions(hidden.shape[0], vocab, chunk_size)
    loss_sum = fused_ce_sum(
        hidden[:, :-1].astype(dtype),  # [B, T-1, D]
        lm_head_kernel.astype(dtype),  # [D, V] or [V, D]
        input_ids[:, 1:].astype(jnp.int32),  # [B, T-1]
        w,
        positions,
        logit_softcap,
        vocab_major,
    )
    return loss_sum, jnp.sum(w)


def reduce_logps(
    token_logps: Array,
    loss_mask: Array,
    segment_ids: Array | None = None,
    *,
    num_segments: int | None = None,
) -> tuple[Array, Array]:
    """Sum [B, T-1] token log-probs per row ([B]) or, given `num_segments` S, per segment ([B, S]).

    Returns (summed log-probs, target-token counts), both fp32 with the same shape. Column k of the
    [B, S] result is segment id k+1; segments that do not occur get 0 and count 0; ids above S are
    dropped, so S must be at least the largest segment id. Needs `segment_ids` when
    `num_segments` is given (packed rows).
    """
    w = target_weights(loss_mask, segment_ids)  # [B, T-1]
    vals = jnp.where(w > 0, token_logps * w, 0.0)
    if num_segments is None:
        return vals.sum(axis=-1), w.sum(axis=-1)
    if segment_ids is None:
        raise UserError("per-segment log-probs (num_segments) need segment_ids from a packed batch")
    # A weight is non-zero only where target t+1 and token t share a segment: use the target's id.
    onehot = jax.nn.one_hot(segment_ids[:, 1:] - 1, num_segments, dtype=jnp.float32)  # [B, T-1, S]
    return jnp.einsum("bt,bts->bs", vals, onehot), jnp.einsum("bt,bts->bs", w, onehot)


def sequence_logps(
    hidden: Array,
    lm_head_kernel: Array,
    input_ids: Array,
    loss_mask: Array,
    segment_ids: Array | None = None,
    *,
    num_segments: int | None = None,
    chunk_size: int | None = None,
    logit_softcap: float | None = None,
    vocab_major: bool = False,
) -> tuple[Array, Array]:
    """Summed completion log-probs and token counts per row [B] or per packed segment [B, S]."""
    logps = token_logprobs(
        hidden,
        lm_head_kernel,
        input_ids,
        chunk_size=chunk_size,
        logit_softcap=logit_softcap,
        vocab_major=vocab_major,
    )
    return reduce_logps(logps, loss_mask, segment_ids, num_segments=num_segments)
