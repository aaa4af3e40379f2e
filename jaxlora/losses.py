"""Training losses: masked causal-LM cross entropy (optionally chunked) and the preference family.

Why this file exists: every training stage ends in one of these pure functions over arrays. They
take final hidden states and the LM-head kernel (not modules), so the trainer can fuse the head
with the loss and never build `[tokens, vocab]` logits at once (`chunk_size`), and the DPO/ORPO/
SimPO formulas can be checked number-for-number against TRL.

Label convention (shared with the data pipeline): `loss_mask[b, t] == 1` means token `t` is a
target. Position `t` predicts `input_ids[t + 1]`, so token log-probs are `[B, T-1]` and are
weighted by `loss_mask[:, 1:]` (and, for packed rows, only when token `t + 1` is in the same
non-padding segment as token `t`).

Conventions:
- LM losses return SUMS plus token counts, never means: the trainer divides the summed loss of all
  micro-batches by the global token count, so k accumulated micro-batches equal one big batch.
- Preference losses take per-sequence SUMMED completion log-probs and return per-pair losses
  (shape of the inputs); the trainer takes the mean over pairs (TRL does `losses.mean()`).
- All arithmetic is fp32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError, did_you_mean
from jaxlora.fused_ce import fused_ce_positions, fused_ce_sum

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


# ----------------------------------------------------------------------------- causal-LM loss


def _chunk_logprobs(
    hidden: Array, kernel: Array, targets: Array, logit_softcap: float | None
) -> Array:
    """log p(targets) for one block of tokens. hidden [..., D], targets [...] -> [...] fp32."""
    # Mixed dtypes promote (bf16 hidden x fp32 kernel multiplies in fp32); callers wanting the
    # fast bf16 path cast the kernel to the compute dtype first.
    dtype = jnp.promote_types(hidden.dtype, kernel.dtype)
    # bf16 x bf16 products accumulate in fp32 and the logits stay fp32 from here on.
    logits = jnp.einsum(
        "...d,dv->...v",
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
) -> Array:
    """Per-token log p(input_ids[:, t+1] | tokens <= t) from final hidden states.

    hidden: [B, T, D] (bf16 or fp32), lm_head_kernel: [D, V] (use `embedding.T` when tied),
    input_ids: [B, T] int. Returns [B, T-1] fp32.

    `chunk_size` (positions along the sequence axis) computes the head + log-softmax in chunks of
    `[B, chunk_size, V]` logits under `lax.scan`, each chunk under `jax.checkpoint` so the backward
    pass recomputes that chunk's logits instead of storing them: peak memory is one chunk's logits,
    not `[B, T-1, V]`. Chunks run along time (not over flattened B*T tokens) so a batch axis sharded
    over devices stays sharded inside every chunk. Value and gradient equal the unchunked path.
    `logit_softcap` applies Gemma-2 style `c * tanh(logits / c)` before the softmax.
    `chunk_size` and `logit_softcap` are static Python values (mark them static under `jit`).
    """
    h = hidden[:, :-1]  # [B, T-1, D]: position t predicts token t+1
    targets = input_ids[:, 1:].astype(jnp.int32)  # [B, T-1]
    n = h.shape[1]
    if chunk_size is None or chunk_size >= n:
        return _chunk_logprobs(h, lm_head_kernel, targets, logit_softcap)
    if chunk_size < 1:
        raise UserError(f"loss chunk_size must be a positive integer, got {chunk_size}")

    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    # Padded positions (zeros hidden, target 0) give finite log-probs that are sliced off below.
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    b, d = h.shape[0], h.shape[2]
    h_chunks = h.reshape(b, n_chunks, chunk_size, d).swapaxes(0, 1)  # [C, B, chunk, D]
    t_chunks = targets.reshape(b, n_chunks, chunk_size).swapaxes(0, 1)  # [C, B, chunk]

    @jax.checkpoint  # backward recomputes this chunk's [B, chunk, V] logits
    def one_chunk(kernel: Array, h_c: Array, t_c: Array) -> Array:
        return _chunk_logprobs(h_c, kernel, t_c, logit_softcap)

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
) -> tuple[Array, Array]:
    """Token-weighted causal-LM loss: (sum of target-token NLL, target-token count), fp32 scalars.

    Divide the sums over all micro-batches (and devices) by the total count for the mean loss.
    Without a softcap this is the fused head + cross-entropy (`fused_ce_sum`): value and
    gradient equal the plain computation, no [tokens, V] logits are kept for the backward pass.
    """
    if logit_softcap is None:
        w = target_weights(loss_mask, segment_ids)  # [B, T-1]
        dtype = jnp.promote_types(hidden.dtype, lm_head_kernel.dtype)
        positions = fused_ce_positions(hidden.shape[0], lm_head_kernel.shape[-1], chunk_size)
        loss_sum = fused_ce_sum(
            hidden[:, :-1].astype(dtype),  # [B, T-1, D]
            lm_head_kernel.astype(dtype),  # [D, V]
            input_ids[:, 1:].astype(jnp.int32),  # [B, T-1]
            w,
            positions,
        )
        return loss_sum, jnp.sum(w)
    logps = token_logprobs(
        hidden, lm_head_kernel, input_ids, chunk_size=chunk_size, logit_softcap=logit_softcap
    )  # [B, T-1]
    w = target_weights(loss_mask, segment_ids)  # [B, T-1]
    # `where` (not just `* w`) keeps a non-finite log-prob at an ignored position out of the sum.
    loss_sum = -jnp.sum(jnp.where(w > 0, logps * w, 0.0))
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
) -> tuple[Array, Array]:
    """Summed completion log-probs and token counts per row [B] or per packed segment [B, S]."""
    logps = token_logprobs(
        hidden, lm_head_kernel, input_ids, chunk_size=chunk_size, logit_softcap=logit_softcap
    )
    return reduce_logps(logps, loss_mask, segment_ids, num_segments=num_segments)


# ----------------------------------------------------------------------------- preference losses


def _f32(x: Array) -> Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise UserError(f"pref_beta must be > 0, got {beta}")


def _per_token(logps: Array, lengths: Array) -> Array:
    # TRL divides by `mask.sum().clamp(min=1)`: an empty completion does not divide by zero.
    return _f32(logps) / jnp.maximum(_f32(lengths), 1.0)


def dpo_loss(
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array,
    ref_rejected_logps: Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Array | None = None,
    rejected_lengths: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Per-pair DPO losses, detached rewards, with TRL 1.x `DPOTrainer._compute_loss` formulas.

    Inputs are summed completion log-probs, any (common) shape; Δ = (πc - refc) - (πr - refr).
    - sigmoid: -(1-ε)·logσ(βΔ) - ε·logσ(-βΔ) (cDPO for ε > 0). TRL 1.16 ignores label_smoothing
      for `sigmoid` (its cDPO form lives on in `aot`); ε = 0, the default, is identical to TRL.
    - hinge:  relu(1 - βΔ)
    - ipo:    (Δc/|c| - Δr/|r| - 1/(2β))², each log-ratio divided by its completion length
      (clamped to ≥ 1), exactly as TRL 1.16 does; needs `chosen_lengths`/`rejected_lengths`.
    - robust: (-(1-ε)·logσ(βΔ) + ε·logσ(-βΔ)) / (1-2ε), ε in [0, 0.5).
    `label_smoothing` is used by sigmoid and robust only (hinge and ipo ignore it, as in TRL).
    Rewards are β·(policy - ref) under `stop_gradient`. Returns fp32 arrays of the input shape.
    """
    if loss_type not in DPO_LOSS_TYPES:
        hint = did_you_mean(loss_type, DPO_LOSS_TYPES)
        raise UserError(
            f"pref_loss: unknown DPO loss type `{loss_type}`{hint}; "
            f"expected one of {', '.join(DPO_LOSS_TYPES)}"
        )
    _check_beta(beta)
    eps = float(label_smoothing)
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise UserError(f"label_smoothing must lie in [0, 0.5) for the robust loss, got {eps}")
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise UserError(
            f"label_smoothing must lie in [0, 0.5] for the sigmoid (cDPO) loss, got {eps}"
        )

    chosen_logratios = _f32(policy_chosen_logps) - _f32(ref_chosen_logps)
    rejected_logratios = _f32(policy_rejected_logps) - _f32(ref_rejected_logps)
    delta = chosen_logratios - rejected_logratios
    logsig = jax.nn.log_sigmoid

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * logsig(beta * delta) - eps * logsig(-beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise UserError(
                "the ipo loss is normalised by completion length: pass chosen_lengths and "
                "rejected_lengths (completion token counts)"
            )
        ipo_delta = _per_token(chosen_logratios, chosen_lengths) - _per_token(
            rejected_logratios, rejected_lengths
        )
        losses = (ipo_delta - 1.0 / (2.0 * beta)) ** 2
    else:  # robust (rDPO): unbiased estimate under label flips with probability ε
        clean = -(1.0 - eps) * logsig(beta * delta)
        flipped = -eps * logsig(-beta * delta)
        losses = (clean - flipped) / (1.0 - 2.0 * eps)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return losses, chosen_rewards, rejected_rewards


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x <= 0, branching at -ln 2 (Mächler 2012; same as TRL's ORPO helper).

    Each branch's argument is clamped into its own safe range so the unused branch of `where`
    produces no inf/NaN gradient.
    """
    t = -0.6931471805599453
    far = jnp.log1p(-jnp.exp(jnp.minimum(x, t)))  # x < t: exp(x) < 1/2, log1p is exact
    near = jnp.log(-jnp.expm1(jnp.maximum(x, t)))  # x >= t: expm1 avoids 1 - exp(x) cancelling
    return jnp.where(x < t, far, near)


def orpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float,
) -> tuple[Array, Array, Array]:
    """ORPO odds-ratio term per pair (reference-free), with rewards β·(mean token log-prob).

    Inputs are SUMMED completion log-probs and token counts; ORPO uses the per-token average
    p̄ = logp/len, log odds(p̄) = p̄ - log(1 - exp(p̄)), and
    losses = -β·logσ(log_odds_chosen - log_odds_rejected)   (positive; ≥ 0).
    The full ORPO objective is `nll_chosen + mean(losses)`: the trainer adds the SFT NLL of the
    chosen completion (its token mean), as TRL's ORPOTrainer (`policy_nll_loss - (β·logσ).mean()`)
    and LLaMA-Factory's `odds_ratio_loss` (`sft_loss + β·(-logσ(log_odds))`) do.
    """
    _check_beta(beta)
    pc = _per_token(chosen_logps, chosen_lengths)
    pr = _per_token(rejected_logps, rejected_lengths)
    # A mean log-prob of exactly 0 (p̄ = 1, reachable in fp32) makes the odds infinite and the
    # gradient NaN; clamping at -1e-7 (odds 1e7) only touches that degenerate case.
    log_odds = (pc - pr) - (_log1mexp(jnp.minimum(pc, -1e-7)) - _log1mexp(jnp.minimum(pr, -1e-7)))
    losses = -beta * jax.nn.log_sigmoid(log_odds)
    return losses, jax.lax.stop_gradient(beta * pc), jax.lax.stop_gradient(beta * pr)


def simpo_loss(
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_lengths: Array,
    rejected_lengths: Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Array, Array, Array]:
    """SimPO per-pair loss (reference-free, length-normalised, target margin γ).

    With p̄ = logp/len and z = β·(p̄c - p̄r - γ/β) = β·(p̄c - p̄r) - γ:
    losses = -(1-ε)·logσ(z) - ε·logσ(-z), as TRL's CPOTrainer `loss_type="simpo"` and
    LLaMA-Factory's `simpo_loss` (ε = 0). Rewards are β·p̄. Inputs are summed log-probs + counts.
    """
    _check_beta(beta)
    eps = float(label_smoothing)
    if not 0.0 <= eps <= 0.5:
        raise UserError(f"label_smoothing must lie in [0, 0.5] for simpo, got {eps}")
    pc = _per_token(chosen_logps, chosen_lengths)
    pr = _per_token(rejected_logps, rejected_lengths)
    logits = (pc - pr) - gamma / beta
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * logits) - eps * jax.nn.log_sigmoid(
        -beta * logits
    )
    return losses, jax.lax.stop_gradient(beta * pc), jax.lax.stop_gradient(beta * pr)


def preference_metrics(
    chosen_rewards: Array,
    rejected_rewards: Array,
    chosen_logps: Array,
    rejected_logps: Array,
    mask: Array | None = None,
) -> dict[str, Array]:
    """Batch means of the TRL/LLaMA-Factory preference metrics (fp32 scalars).

    `mask` (same shape, 1 = real pair) leaves out padding pairs, e.g. empty packed segments.
    Accuracy is the share of pairs with chosen_reward > rejected_reward (strict, as TRL).
    """
    cr, rr = _f32(chosen_rewards), _f32(rejected_rewards)
    m = jnp.ones_like(cr) if mask is None else _f32(mask)
    denom = jnp.maximum(m.sum(), 1.0)

    def mean(x: Array) -> Array:
        return jax.lax.stop_gradient(jnp.sum(jnp.where(m > 0, _f32(x) * m, 0.0)) / denom)

    return {
        "rewards/chosen": mean(cr),
        "rewards/rejected": mean(rr),
        "rewards/accuracies": mean((cr > rr).astype(jnp.float32)),
        "rewards/margins": mean(cr - rr),
        "logps/chosen": mean(chosen_logps),
        "logps/rejected": mean(rejected_logps),
    }
