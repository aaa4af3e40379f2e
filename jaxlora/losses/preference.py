"""Preference losses (DPO family, ORPO, SimPO, KTO) and their logged metrics.

Why this file exists: the formulas users compare against TRL 1.x live in one place, checked
number-for-number by the tests. They take per-sequence SUMMED completion log-probs (from
`jaxlora.losses.lm.sequence_logps`) and return per-pair losses (the shape of the inputs); the
trainer takes the mean over pairs (TRL does `losses.mean()`). All arithmetic is fp32.
KTO is unpaired: one completion per example with a thumbs-up/down label, plus a batch-level KL
estimate from mismatched (prompt, completion) rows (`kto_kl`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora.errors import UserError, did_you_mean

Array = jax.Array

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


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


def kto_kl(policy_kl_logps: Array, ref_kl_logps: Array, mask: Array | None = None) -> Array:
    """KTO's reference point z0: the batch-mean log-ratio on MISMATCHED rows, clamped at 0.

    TRL 1.x `KTOTrainer`: `kl = (KL_logps - ref_KL_logps).mean().detach()`, then (mean over
    processes) `.clamp(min=0)`. The mismatched rows pair prompt i with completion i-1 of the same
    batch (rotated by one within the batch, as TRL does). `mask` (1 = real row) keeps padding rows
    out of the mean. No gradient flows through it (as in TRL and the KTO paper).
    """
    diff = _f32(policy_kl_logps) - _f32(ref_kl_logps)
    m = jnp.ones_like(diff) if mask is None else _f32(mask)
    mean = jnp.sum(jnp.where(m > 0, diff * m, 0.0)) / jnp.maximum(m.sum(), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logps: Array,
    ref_logps: Array,
    labels: Array,
    kl: Array,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Array, Array]:
    """Per-example KTO losses and detached rewards (TRL 1.x `KTOTrainer`, `loss_type="kto"`).

    With r = policy - ref (summed completion log-probs) and z0 = `kl` (from `kto_kl`):
    - desirable (label true):    w_d · (1 - σ(β·(r - z0)))
    - undesirable (label false): w_u · (1 - σ(β·(z0 - r)))
    Rewards are β·r. TRL's batch loss is the plain mean over all examples (`losses.nanmean()` of
    the weighted chosen and rejected losses), so the trainer divides the sum by the example count.
    LLaMA-Factory's `kto_chosen_weight`/`kto_rejected_weight` are w_d/w_u.
    """
    _check_beta(beta)
    if desirable_weight < 0 or undesirable_weight < 0:
        raise UserError(
            "kto_chosen_weight and kto_rejected_weight must be >= 0, got "
            f"{desirable_weight} and {undesirable_weight}"
        )
    logratios = _f32(policy_logps) - _f32(ref_logps)
    z0 = _f32(kl)
    good = jnp.asarray(labels).astype(bool)
    chosen = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratios - z0)))
    rejected = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - logratios)))
    losses = jnp.where(good, chosen, rejected)
    return losses, jax.lax.stop_gradient(beta * logratios)


def kto_metrics(
    rewards: Array,
    logps: Array,
    labels: Array,
    kl: Array,
    mask: Array | None = None,
) -> dict[str, Array]:
    """TRL's KTO metrics for one batch: means over the desirable / undesirable examples.

    `rewards/chosen` = sum of desirable rewards / number desirable (likewise rejected and the
    log-probs); `rewards/margins` = chosen mean - rejected mean; `kl` = z0. A side with no examples
    gives 0 (TRL leaves the metric out for that batch).
    """
    good = jnp.asarray(labels).astype(bool)
    m = jnp.ones(good.shape, jnp.float32) if mask is None else _f32(mask)
    gm, bm = jnp.where(good, m, 0.0), jnp.where(good, 0.0, m)

    def mean(x: Array, w: Array) -> Array:
        total = jnp.sum(jnp.where(w > 0, _f32(x) * w, 0.0))
        return jax.lax.stop_gradient(total / jnp.maximum(w.sum(), 1.0))

    chosen, rejected = mean(rewards, gm), mean(rewards, bm)
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": mean(logps, gm),
        "logps/rejected": mean(logps, bm),
        "kl": jax.lax.stop_gradient(_f32(kl)),
    }
