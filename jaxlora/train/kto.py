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
division by the summed count gives TRL's `losses.nanmean()` per batch. Metric sums are keyed
`pref/...` with the counts `pref/count`, `pref/count/chosen`, `pref/count/rejected`, which the
loop turns into TRL's means (`jaxlora.train.tracking.preference_means`): TensorBoard's
`train/rewards/chosen`, `train/rewards/margins`, `train/kl`, `train/logps/rejected`, ...

`KTOStage` is the stage object of `stage: kto` (`jaxlora.train.stage` interface): one target per
row, the reference set up like DPO's (`jaxlora.train.dpo.reference_needs_copy`), and the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.data.batching import KEYS
from jaxlora.data.feedback import KL_PREFIX
from jaxlora.losses import kto_kl, kto_loss, reduce_logps, token_logprobs
from jaxlora.models.llama import head_weight
from jaxlora.train.dpo import place_like_policy, reference_copy, reference_needs_copy
from jaxlora.train.steps import variables_for


def _rows(batch: dict) -> tuple[jax.Array, ...]:
    """(input_ids, loss_mask, segment_ids, positions) [2B, T]: matched rows, then KL rows."""
    return tuple(jnp.concatenate([batch[k], batch[f"{KL_PREFIX}{k}"]], axis=0) for k in KEYS)


def sequence_logps(module, variables, batch, model_config, chunk_size=None, rngs=None):
    """Summed completion log-probs (matched [B], mismatched [B]) and the real-row mask [B]."""
    ids, mask, seg, pos = _rows(batch)
    hidden = module.apply(variables, ids, pos, seg, return_hidden=True, rngs=rngs or {})
    head, vocab_major = head_weight(variables["params"], model_config)  # [V, D] or [D, V]
    cap = model_config.final_logit_softcap
    tok = token_logprobs(
        hidden, head, ids, chunk_size=chunk_size, logit_softcap=cap, vocab_major=vocab_major
    )
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
    reference variables under `stop_gradient`, or a cache). Metric sums: `pref/rewards/chosen`
    and `pref/logps/chosen` over desirable rows with `pref/count/chosen`, likewise rejected;
    `pref/kl` is z0 times the row count (so dividing by `pref/count` gives z0).
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
        "pref/rewards/chosen": total(rewards, good),
        "pref/rewards/rejected": total(rewards, bad),
        "pref/logps/chosen": total(logps, good),
        "pref/logps/rejected": total(logps, bad),
        "pref/count/chosen": jnp.sum(good.astype(jnp.float32)),
        "pref/count/rejected": jnp.sum(bad.astype(jnp.float32)),
        "pref/kl": z0 * n,
        "pref/count": n,
    }
    return total(losses, present), n, metrics


class KTOStage:
    """`stage: kto`: rows with a desirable/undesirable label, z0 from the batch's KL rows."""

    has_perplexity = False  # a preference loss has no perplexity
    generation_samples = False

    def __init__(self, parts: Any, data: Any = None, log: Callable[[str], None] = print):
        """`parts`: the run's `ModelParts`; its `frozen` becomes {"base", "ref_trainable"?}."""
        f = parts.cfg.finetune
        self.mode = parts.mode
        self.model_config = parts.model.config
        self.beta = float(f.pref_beta)
        self.desirable_weight = float(f.kto_chosen_weight)
        self.undesirable_weight = float(f.kto_rejected_weight)
        frozen = {"base": parts.frozen}
        if reference_needs_copy(parts):  # full / freeze / non-zero LoRA start: initial copy
            tied = parts.model.config.tie_word_embeddings
            copy = reference_copy(parts.trainable, parts.mode, parts.model.dtype, tied)
            frozen["ref_trainable"] = place_like_policy(parts, copy)
        parts.frozen = frozen
        self.reference_traces = 0  # Python side effect: counts traces of the reference pass

    def target_counts(self, samples: list) -> np.ndarray:
        """One target per row: the loss is the mean over rows (TRL's `losses.nanmean()`)."""
        return np.ones(len(samples), np.int64)

    def add_to_batch(self, host: dict, batcher: Any, position: Any, split: str = "train") -> dict:
        return host  # the Batcher already adds the KL rows and `kto_label`

    def loss_fn(self, module: Any, chunk_size: int | None) -> Callable:
        """loss(trainable, frozen, batch, rng) -> (loss_sum * loss_scale, (loss_sum, n_rows,
        metric sums)); the reference forward (dropout off) runs inside the same step."""
        if chunk_size is not None:
            chunk_size = max(16, chunk_size // 2)  # sized for B rows; matched + KL rows are 2B
        ref_module = module.clone(deterministic=True)

        def loss(trainable, frozen, batch, rng):
            self.reference_traces += 1
            if "ref_trainable" in frozen:
                ref_vars = variables_for(self.mode, frozen["ref_trainable"], frozen["base"])
            else:  # the frozen base without the adapter / virtual-token collection
                ref_vars = {"params": frozen["base"]}
            ref, ref_kl, _ = sequence_logps(
                ref_module, ref_vars, batch, self.model_config, chunk_size
            )
            loss_sum, n, metrics = kto_batch_loss(
                module,
                variables_for(self.mode, trainable, frozen["base"]),
                (ref, ref_kl),
                batch,
                self.model_config,
                beta=self.beta,
                desirable_weight=self.desirable_weight,
                undesirable_weight=self.undesirable_weight,
                chunk_size=chunk_size,
                rngs={"dropout": rng},
            )
            return loss_sum * batch.get("loss_scale", 1.0), (loss_sum, n, metrics)

        return loss
