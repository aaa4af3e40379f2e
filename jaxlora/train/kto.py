"""KTO's batch loss over a model: matched rows, mismatched KL rows, reference, loss and metrics.

Why this file exists: the KTO step differs from SFT and DPO in its batch (one judged completion
per row plus the mismatched `kl_*` rows of `jaxlora.data.feedback`) and in its reference point
z0, a batch-level KL estimate. This module turns a batch and the policy / reference variables
into TRL 1.x `KTOTrainer` numbers (checked against `KTOTrainer._compute_loss` with real models
in tests/test_kto_trl_model.py):

1. one forward over [2B, T]: matched rows stacked over KL rows (policy; with dropout);
2. the same for the reference (no gradient): LoRA / prompt / prefix runs call the base without
   the adapter collection, full runs a frozen initial copy, exactly as `jaxlora.train.dpo`;
3. z0 = clamp(mean over real rows of (policy - ref) KL log-ratios, 0) (`losses.kto_kl`), then
   per-row weighted losses (`losses.kto_loss`).

Returns SUMS over real rows (dummy padding rows are out) and the row count, so the trainer's
division by the summed count gives TRL's `losses.nanmean()` per batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.data.batching import KEYS
from jaxlora.data.feedback import KL_PREFIX
from jaxlora.losses import kto_kl, kto_loss, reduce_logps, token_logprobs
from jaxlora.models.llama import head_kernel


def _rows(batch: dict) -> tuple[jax.Array, ...]:
    """(input_ids, loss_mask, segment_ids, positions) [2B, T]: matched rows, then KL rows."""
    return tuple(jnp.concatenate([batch[k], batch[f"{KL_PREFIX}{k}"]], axis=0) for k in KEYS)


def sequence_logps(module, variables, batch, model_config, chunk_size=None, rngs=None):
    """Summed completion log-probs (matched [B], mismatched [B]) and the real-row mask [B]."""
    ids, mask, seg, pos = _rows(batch)
    hidden = module.apply(variables, ids, pos, seg, return_hidden=True, rngs=rngs or {})
    kernel = head_kernel(variables["params"], model_config)  # [D, V]
    tok = token_logprobs(hidden, kernel, ids, chunk_size=chunk_size)  # [2B, T-1] fp32
    sums, _ = reduce_logps(tok, mask, seg)  # [2B]
    b = ids.shape[0] // 2
    present = jnp.any(seg[:b] > 0, axis=-1)  # [B]: dummy rows are all padding
    return sums[:b], sums[b:], present


def kto_batch_loss(
    module: Any,
    policy_variables: dict,
    ref_logps: tuple[jax.Array, jax.Array],
    batch: dict,
    model_config: Any,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    chunk_size: int | None = None,
    rngs: dict | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(sum of per-row losses, number of real rows, metric SUMS keyed like TRL's KTO metrics).

    `ref_logps` = (matched, mismatched) reference log-probs [B] (from `sequence_logps` on the
    reference variables under `stop_gradient`, or a cache). Metric sums: `kto/rewards/chosen`
    and `kto/logps/chosen` over desirable rows with `kto/count/chosen`, likewise rejected;
    `kto/kl` is z0 times the row count (so dividing by `kto/count` gives z0).
    """
    pol, pol_kl, present = sequence_logps(
        module, policy_variables, batch, model_config, chunk_size, rngs
    )
    ref, ref_kl = (jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in ref_logps)
    z0 = kto_kl(pol_kl, ref_kl, present)
    labels = batch["kto_label"] > 0
    losses, rewards = kto_loss(
        pol,
        ref,
        labels,
        z0,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    good = present & labels
    bad = present & ~labels

    def total(x, m):  # `where` keeps padding rows out even if their values are not finite
        return jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0))

    n = jnp.sum(present.astype(jnp.float32))
    logps = jax.lax.stop_gradient(pol)
    metrics = {
        "kto/rewards/chosen": total(rewards, good),
        "kto/rewards/rejected": total(rewards, bad),
        "kto/logps/chosen": total(logps, good),
        "kto/logps/rejected": total(logps, bad),
        "kto/count/chosen": jnp.sum(good.astype(jnp.float32)),
        "kto/count/rejected": jnp.sum(bad.astype(jnp.float32)),
        "kto/kl": z0 * n,
        "kto/count": n,
    }
    return total(losses, present), n, metrics


def kto_metric_means(sums: dict[str, float]) -> dict[str, float]:
    """Metric sums (over one or more batches) → TRL's logged means; margins = chosen - rejected."""
    out = {}
    nc, nr = sums.get("kto/count/chosen", 0.0), sums.get("kto/count/rejected", 0.0)
    for side, cnt in (("chosen", nc), ("rejected", nr)):
        if cnt > 0:
            out[f"rewards/{side}"] = sums[f"kto/rewards/{side}"] / cnt
            out[f"logps/{side}"] = sums[f"kto/logps/{side}"] / cnt
    if nc > 0 and nr > 0:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if sums.get("kto/count", 0.0) > 0:
        out["kl"] = sums["kto/kl"] / sums["kto/count"]
    return out
