"""DPO (and reference-free ORPO / SimPO) as a training stage: reference model, pairs, loss.

Why this file exists: a preference step differs from an SFT step in four ways, and all four live
here (the cache's storage in `jaxlora.train.ref_cache`) so the training loop stays stage-agnostic:

1. **Reference model.** LoRA: the reference is the frozen base with the adapter switched off —
   the same weights, called without the "lora" collection, under `stop_gradient`, inside the same
   jitted step (no second copy). If the adapter does not start at zero (`adapter_name_or_path`,
   PiSSA), the reference is the INITIAL model, so a frozen copy of the initial adapter is kept.
   Full fine-tuning: a frozen copy of the initial params. `parts.frozen` becomes
   `{"base": <what the policy forward needs>, "ref_trainable": <initial trainable copy>?}`; only
   this module's loss consumes it.
2. **Pairs, not tokens.** `target_counts` gives pairs per sample, so the trainer's token-weighted
   division (`loss_scale`) turns the summed per-pair losses into the mean over pairs; with
   gradient accumulation, k micro-batches equal one big batch.
3. **One forward for chosen and rejected.** Unpacked batches stack `chosen_*` over `rejected_*` to
   [2B, T]; packed rows hold pair k in segments 2k-1 (chosen) and 2k (rejected).
4. **Cached reference log-probs** (`precompute_ref_logps: true`): computed once before training
   and stored on disk by `jaxlora.train.ref_cache` (fingerprinting, file format, precompute pass).
   The
   batches then carry `ref_chosen_logps`/`ref_rejected_logps` [B, P] and the step traces no
   reference forward.

Metrics are SUMS over real pairs (dummy all-padding rows and empty packed slots are masked out)
keyed `pref/...`, plus `pref/count`; the loop divides by the summed count.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.data.batching import KEYS, Batcher
from jaxlora.losses import (
    dpo_loss,
    orpo_loss,
    reduce_logps,
    simpo_loss,
    token_logprobs,
)
from jaxlora.models.llama import head_weight
from jaxlora.train import ref_cache as dpo_cache
from jaxlora.train.steps import variables_for

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class PairLogps(NamedTuple):
    """Per-pair sums over completion tokens, all [B, P] fp32 (P = 1 unpacked)."""

    chosen: jax.Array
    rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array
    present: jax.Array  # bool: a real pair (not a dummy row / empty packed slot)


def _is_packed(samples: list) -> bool:
    return bool(samples) and getattr(samples[0], "segment_ids", None) is not None


def _pairs_in_row(sample: Any) -> int:
    """Packed row: segments 2k-1/2k are pair k, so pairs = ceil(max segment id / 2)."""
    return (int(np.max(sample.segment_ids)) + 1) // 2


def _stack_rows(batch: dict) -> tuple[jax.Array, ...]:
    """(input_ids, loss_mask, segment_ids, positions), [2B, T] chosen-then-rejected, or the
    packed [B, T] rows as they are."""
    if "chosen_input_ids" in batch:
        return tuple(
            jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in KEYS
        )
    return tuple(batch[k] for k in KEYS)


def reference_copy(tree: Any, mode: str, dtype: Any, tied: bool) -> Any:
    """A frozen copy (new buffers, so donating the policy never touches it) of the initial
    trainable tree. Full/freeze: the compute dtype except the LM head (the policy's fp32 head
    kernel multiplies in fp32, so the copy keeps it fp32 and step 0 matches bit for bit).
    LoRA: the adapter as it is (fp32)."""

    def copy(path, x):
        keys = tuple(getattr(k, "key", k) for k in path)
        head = keys[:1] == ("lm_head",) or (tied and keys[:1] == ("embed_tokens",))
        keep = mode == "lora" or head
        return jnp.array(x, dtype=x.dtype if keep else dtype, copy=True)

    return jax.tree_util.tree_map_with_path(copy, tree)


def place_like_policy(run: Any, tree: Any) -> Any:
    """Shard the reference copy on the run's mesh exactly as the policy's trainable tree
    (`run`: the run's `ModelParts`)."""
    mesh = getattr(run, "mesh", None)
    if mesh is None or mesh.size == 1:
        return tree
    from jaxlora.parallel import sharding

    if run.mode == "lora":
        target = sharding.adapter_shardings(mesh, tree, run.param_logical)
    else:
        target = sharding.param_shardings(mesh, run.param_logical, tree)
    return jax.device_put(tree, target)


def adapter_nonzero(adapter: Any) -> bool:
    """True when the adapter changes the model (some lora_b is non-zero)."""
    flat = jax.tree_util.tree_flatten_with_path(adapter)[0]
    return any(getattr(p[-1], "key", None) == "lora_b" and bool(jnp.any(x != 0)) for p, x in flat)


def reference_needs_copy(parts: Any) -> bool:
    """Whether the reference (the INITIAL model) needs a frozen copy of the initial trainable
    tree: full / freeze runs, and LoRA runs whose adapter does not start at zero (continued
    adapter, PiSSA). A zero-start LoRA, prompt / prefix tuning and bottleneck adapters use the
    frozen base without their collection (TRL's reference for PEFT models: adapter disabled)."""
    if parts.mode in ("full", "freeze"):
        return True
    if parts.mode != "lora":
        return False
    f = parts.cfg.finetune
    return (
        bool(parts.cfg.model.adapter_name_or_path)
        or bool(getattr(f, "pissa_init", False))
        or adapter_nonzero(parts.trainable)
    )


class DPOSetup:
    """Preference-stage state for one run; see the module docstring."""

    has_perplexity = False  # a preference loss has no perplexity
    generation_samples = False

    def __init__(self, parts: Any, data: Any, log: Callable[[str], None] = print):
        """`parts`: the run's `ModelParts` (its `frozen` is replaced here); `data`: its
        `DataBundle`."""
        run = parts
        f = run.cfg.finetune
        self.mode = run.mode
        self.model_config = run.model.config
        self.loss_type = f.pref_loss
        self.beta = float(f.pref_beta)
        self.label_smoothing = float(f.dpo_label_smoothing)
        self.ftx = float(f.pref_ftx)
        self.simpo_gamma = float(f.simpo_gamma)
        self.use_reference = not f.reference_free
        self.packed = _is_packed(data.train)
        self.pairs_per_row = 1
        if self.packed:  # most pairs any packed row holds (train or eval)
            splits = [s for s in (data.train, data.eval) if len(s)]
            self.pairs_per_row = max(int(self.target_counts(s).max()) for s in splits)
        self.reference_traces = 0  # Python side effect: counts traces of the reference pass
        self.cache_path: Path | None = None
        self.cache_hit = False
        self._tables: dict[str, np.ndarray] = {}
        self._check_loss_settings()

        base = run.frozen
        needs_initial = self.use_reference and reference_needs_copy(run)
        frozen = {"base": base}
        if self.use_reference and f.precompute_ref_logps:
            # Before the first step `run.trainable` IS the initial model: no copy needed.
            initial = run.trainable if needs_initial else None
            self._tables, self.cache_path, self.cache_hit = dpo_cache.cached_tables(
                run,
                data,
                base,
                initial,
                self.reference_fn,
                packed=self.packed,
                pairs_per_row=self.pairs_per_row,
                log=log,
            )
        else:
            if f.precompute_ref_logps:
                log(
                    f"note: precompute_ref_logps ignored: pref_loss {self.loss_type} "
                    "has no reference"
                )
            if needs_initial:
                tied = run.model.config.tie_word_embeddings
                copy = reference_copy(run.trainable, run.mode, run.model.dtype, tied)
                frozen["ref_trainable"] = place_like_policy(run, copy)
        run.frozen = frozen
        self.frozen_keys = tuple(frozen)

    # ------------------------------------------------------------------------- batches
    def target_counts(self, samples: list) -> np.ndarray:
        """Per sample: the number of preference pairs (1 unpacked; pairs in a packed row)."""
        if _is_packed(samples):
            fast = getattr(samples, "units_per_row", None)  # cached rows: from the packing plan
            if fast is not None:
                return np.asarray(fast(), np.int64)
            return np.asarray([_pairs_in_row(s) for s in samples], np.int64)
        return np.ones(len(samples), np.int64)

    def add_to_batch(
        self, host_batch: dict, batcher: Batcher, position: tuple[int, int], split: str = "train"
    ) -> dict:
        """With cached reference log-probs: this host's rows' `ref_chosen_logps` /
        `ref_rejected_logps` [B/P, pairs_per_row] fp32 (dummy rows get 0 and are masked out)."""
        table = self._tables.get(split)
        if table is None:
            return host_batch
        idx = batcher.global_indices(*position)
        lo = batcher.process_index * batcher.local_batch_size
        idx = idx[lo : lo + batcher.local_batch_size]
        vals = np.where((idx >= 0)[:, None, None], table[np.maximum(idx, 0)], 0.0)
        out = dict(host_batch)
        out["ref_chosen_logps"] = vals[..., 0].astype(np.float32)
        out["ref_rejected_logps"] = vals[..., 1].astype(np.float32)
        return out

    def frozen_shardings(self, base_shardings: Any, trainable_shardings: Any) -> dict:
        """Shardings of `parts.frozen` from the policy's: the reference copy is sharded like the
        trainable tree it was copied from."""
        out = {"base": base_shardings}
        if "ref_trainable" in self.frozen_keys:
            out["ref_trainable"] = trainable_shardings
        return out

    # ------------------------------------------------------------------------- forward passes
    def _pair_logps(self, hidden, head, vocab_major, ids, mask, seg, chunk_size) -> PairLogps:
        cap = self.model_config.final_logit_softcap
        tok = token_logprobs(
            hidden, head, ids, chunk_size=chunk_size, logit_softcap=cap, vocab_major=vocab_major
        )
        if self.packed:
            s = 2 * self.pairs_per_row
            sums, counts = reduce_logps(tok, mask, seg, num_segments=s)  # [B, S]
            sizes = jax.nn.one_hot(seg - 1, s, dtype=jnp.float32).sum(axis=1)  # [B, S] tokens
            present = (sizes[:, 0::2] > 0) | (sizes[:, 1::2] > 0)
            return PairLogps(
                sums[:, 0::2], sums[:, 1::2], counts[:, 0::2], counts[:, 1::2], present
            )
        sums, counts = reduce_logps(tok, mask, seg)  # [2B]
        b = ids.shape[0] // 2
        present = jnp.any(seg[:b] > 0, axis=-1) | jnp.any(seg[b:] > 0, axis=-1)  # [B]
        return PairLogps(
            sums[:b, None], sums[b:, None], counts[:b, None], counts[b:, None], present[:, None]
        )

    def _forward(self, module, variables, batch, chunk_size, rngs=None) -> PairLogps:
        ids, mask, seg, pos = _stack_rows(batch)
        hidden = module.apply(
            variables, ids, pos, seg, return_hidden=True, rngs=rngs or {}
        )  # [R, T, D]
        head, vocab_major = head_weight(variables["params"], self.model_config)
        return self._pair_logps(hidden, head, vocab_major, ids, mask, seg, chunk_size)

    def reference_fn(self, module, chunk_size: int | None) -> Callable:
        """ref(frozen, batch) -> (ref_chosen_logps, ref_rejected_logps) [B, P], no gradient.

        LoRA without a reference copy: the policy's module called WITHOUT the "lora" collection,
        i.e. the base model with adapters off. Otherwise the frozen initial copy. Dropout off.
        """
        ref_module = module.clone(deterministic=True)

        def ref(frozen, batch):
            self.reference_traces += 1
            if "ref_trainable" in frozen:
                variables = variables_for(self.mode, frozen["ref_trainable"], frozen["base"])
            else:
                variables = {"params": frozen["base"]}
            out = self._forward(ref_module, variables, batch, chunk_size)
            return jax.lax.stop_gradient(out.chosen), jax.lax.stop_gradient(out.rejected)

        return ref

    # ------------------------------------------------------------------------- loss
    def _check_loss_settings(self) -> None:
        """Surface bad loss settings (UserError) now, not at the first trace."""
        z = jnp.zeros((1,), jnp.float32)
        one = jnp.ones((1,), jnp.float32)
        self._pair_losses(PairLogps(z - 1, z - 1, one, one, one > 0), z, z)

    def _pair_losses(self, pol: PairLogps, ref_c, ref_r):
        """(losses, chosen_rewards, rejected_rewards, chosen NLL per token), all [B, P]."""
        nll = -pol.chosen / jnp.maximum(pol.chosen_len, 1.0)  # mean NLL of the chosen answer
        if self.loss_type == "orpo":
            # ORPO = chosen NLL + β·(-logσ(log odds ratio)) per pair (LLaMA-Factory, TRL).
            odds, cr, rr = orpo_loss(
                pol.chosen, pol.rejected, pol.chosen_len, pol.rejected_len, beta=self.beta
            )
            losses = nll + odds
        elif self.loss_type == "simpo":
            losses, cr, rr = simpo_loss(
                pol.chosen,
                pol.rejected,
                pol.chosen_len,
                pol.rejected_len,
                beta=self.beta,
                gamma=self.simpo_gamma,
                label_smoothing=self.label_smoothing,
            )
        else:
            losses, cr, rr = dpo_loss(
                pol.chosen,
                pol.rejected,
                ref_c,
                ref_r,
                beta=self.beta,
                loss_type=self.loss_type,
                label_smoothing=self.label_smoothing,
                chosen_lengths=pol.chosen_len,
                rejected_lengths=pol.rejected_len,
            )
        if self.ftx > 0:  # LLaMA-Factory's pref_ftx: + ftx · chosen NLL (token mean per pair)
            losses = losses + self.ftx * nll
        return losses, cr, rr, nll

    def loss_fn(self, module, chunk_size: int | None) -> Callable:
        """loss(trainable, frozen, batch, rng) -> (loss_sum * loss_scale, (loss_sum, n_pairs,
        metrics)); loss_sum is the sum of per-pair losses over real pairs."""
        if chunk_size is not None and not self.packed:
            # The run sized chunks for B rows; chosen + rejected stack to 2B rows.
            chunk_size = max(16, chunk_size // 2)
        ref = self.reference_fn(module, chunk_size) if self.use_reference else None

        def loss(trainable, frozen, batch, rng):
            variables = variables_for(self.mode, trainable, frozen["base"])
            pol = self._forward(module, variables, batch, chunk_size, {"dropout": rng})
            ref_c = ref_r = jnp.zeros_like(pol.chosen)
            if ref is not None:
                if REF_KEYS[0] in batch:  # cached: no reference forward is traced
                    ref_c, ref_r = (jnp.asarray(batch[k], jnp.float32) for k in REF_KEYS)
                else:
                    ref_c, ref_r = ref(frozen, batch)
            losses, cr, rr, nll = self._pair_losses(pol, ref_c, ref_r)
            m = pol.present

            def total(x):  # sum over real pairs; `where` keeps padding out even if non-finite
                return jnp.sum(jnp.where(m, x.astype(jnp.float32), 0.0))

            loss_sum = total(losses)
            n_pairs = jnp.sum(m.astype(jnp.float32))
            metrics = {
                "pref/rewards/chosen": total(cr),
                "pref/rewards/rejected": total(rr),
                "pref/rewards/accuracies": total(cr > rr),
                "pref/rewards/margins": total(cr - rr),
                "pref/logps/chosen": total(jax.lax.stop_gradient(pol.chosen)),
                "pref/logps/rejected": total(jax.lax.stop_gradient(pol.rejected)),
                "pref/count": n_pairs,
            }
            if self.loss_type == "orpo" or self.ftx > 0:
                metrics["pref/nll_loss"] = total(jax.lax.stop_gradient(nll))
            return loss_sum * batch.get("loss_scale", 1.0), (loss_sum, n_pairs, metrics)

        return loss
