"""Optimiser: HF-identical lr schedules, AdamW on the trainable subtree only, accumulation.

The optimiser is built for, and initialised on, the trainable tree alone (the adapter for LoRA),
so frozen weights never get Adam moments or a `MultiSteps` accumulator (and with
`gradient_accumulation_steps: 1` there is no `MultiSteps` at all). Schedules count optimiser
steps (`MultiSteps` only advances the inner count when it applies an update), matching
`transformers.get_*_schedule_with_warmup` step for step.

Token weighting: each micro-batch's loss is `sum(token NLL) * k / tokens_in_its_group`, where the
group is the k micro-batches of one optimiser step. `MultiSteps` averages the k gradients, which
gives exactly the gradient of the group's token-mean loss: k micro-batches == one big batch.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
NO_DECAY_LEAVES = ("bias", "scale", "embedding_norm")


def lr_schedule(
    peak_lr: float, scheduler: str, total_steps: int, warmup_steps: int
) -> optax.Schedule:
    """lr as a function of the optimiser step (0-based), as transformers computes it."""
    if scheduler not in SCHEDULES:
        raise UserError(f"lr_scheduler_type {scheduler!r} is not supported; use {SCHEDULES}")
    total = max(int(total_steps), 1)
    warm = int(warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm_f = step / max(warm, 1)
        if scheduler == "constant":
            return jnp.asarray(peak_lr, jnp.float32)
        if scheduler == "constant_with_warmup":
            return peak_lr * jnp.where(step < warm, warm_f, 1.0)
        progress = (step - warm) / max(total - warm, 1)
        if scheduler == "linear":
            decay = jnp.maximum(0.0, (total - step) / max(total - warm, 1))
        else:  # cosine with num_cycles = 0.5
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return peak_lr * jnp.where(step < warm, warm_f, decay)

    return schedule


def warmup_steps_for(total_steps: int, warmup_steps: int, warmup_ratio: float) -> int:
    if warmup_steps:
        return int(warmup_steps)
    return int(math.ceil(total_steps * warmup_ratio))


def _decay_mask(tree: Any) -> Any:
    """True where weight decay applies: not on biases or norm scales (HF Trainer's rule)."""

    def leaf(path, _):
        return not any(getattr(k, "key", None) in NO_DECAY_LEAVES for k in path)

    return jax.tree_util.tree_map_with_path(leaf, tree)


# LoRA+ "B group": PEFT's `create_loraplus_optimizer` and LLaMA-Factory give lr x ratio to every
# lora_B matrix and every 1-D adapter parameter, i.e. DoRA's magnitude vectors too. Their
# `loraplus_lr_embedding` group only exists for adapters on embedding layers, which jaxlora
# does not create (adapters target linear projections only), so that setting has no effect.
LORAPLUS_FAST = ("lora_b", "magnitude")


def _loraplus_labels(tree: Any) -> Any:
    def leaf(path, _):
        keys = [getattr(k, "key", None) for k in path]
        return "lora_b" if any(k in LORAPLUS_FAST for k in keys) else "default"

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _to_f32(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def fp32_state(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with fp32 optimiser state and fp32 updates whatever the parameter dtype.

    optax's Adam keeps `nu` (and MultiSteps casts its accumulator back) in the parameter dtype,
    so bf16 weights (`full_precision_master: false`) would get bf16 moments. Here `tx` sees
    fp32 params and gradients; `optax.apply_updates` rounds `param + update` to the param dtype
    once. A no-op for fp32 params. The wrapper is stateless: the state is `tx`'s own.
    Limitation: with bf16 weights and no fp32 master copy, an update smaller than half a bf16
    ulp of its weight (~0.4% relative) is lost, as in LLaMA-Factory's `pure_bf16`.
    """

    def init(params):
        return tx.init(_to_f32(params))

    def update(updates, state, params=None):
        params = None if params is None else _to_f32(params)
        return tx.update(_to_f32(updates), state, params)

    return optax.GradientTransformation(init, update)


def make_optimizer(
    *,
    learning_rate: float,
    scheduler: str,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    accumulation_steps: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    loraplus_lr_ratio: float | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule). Init the optimizer on the trainable tree only."""
    sched = lr_schedule(learning_rate, scheduler, total_steps, warmup_steps)

    def adamw(s):
        return optax.adamw(s, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)

    if loraplus_lr_ratio:
        # LoRA+ (Hayou et al. 2024): B matrices (and DoRA magnitudes) learn `ratio` x faster.
        ratio = float(loraplus_lr_ratio)
        inner = optax.multi_transform(
            {"default": adamw(sched), "lora_b": adamw(lambda s: sched(s) * ratio)},
            _loraplus_labels,
        )
    else:
        inner = adamw(sched)
    if max_grad_norm and max_grad_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(max_grad_norm), inner)
    k = max(int(accumulation_steps), 1)
    if k == 1:
        # No accumulator at k = 1: MultiSteps would keep a full fp32 copy of the gradient in
        # the state (+33% over Adam's two moments for full fine-tuning) for nothing.
        tx = skip_nonfinite_updates(inner)
    else:
        tx = optax.MultiSteps(
            inner,
            every_k_schedule=k,
            should_skip_update_fn=optax.skip_not_finite,  # never reached: see below
        )
        tx = zero_nonfinite_gradients(tx)
    # The wrappers are stateless: the state is MultiStepsState (k > 1) or `inner`'s own.
    return fp32_state(tx), sched


def skip_nonfinite_updates(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """A non-finite gradient (k = 1) skips its update entirely: zero update, and `tx`'s state
    (moments, step count, hence the schedule position) stays as it was."""

    def update(updates, state, params=None):
        finite = jnp.isfinite(optax.global_norm(updates))
        safe = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_updates, new_state = tx.update(safe, state, params)
        new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        new_updates = jax.tree_util.tree_map(
            lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates
        )
        return new_updates, new_state

    return optax.GradientTransformation(tx.init, update)


def zero_nonfinite_gradients(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """A non-finite micro-batch gradient enters `tx` as zeros (for accumulation, k > 1).

    Skipping it inside `MultiSteps` would not advance its mini-step, so every later group would be
    shifted by one micro-batch against the loop's groups (whose token counts set `loss_scale`).
    Entering zeros keeps the phase: the poisoned micro-batch contributes nothing and its group's
    update is made from the others (still normalised by the whole group's tokens).
    """

    def update(updates, state, params=None):
        finite = jnp.isfinite(optax.global_norm(updates))
        safe = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        return tx.update(safe, state, params)

    return optax.GradientTransformation(tx.init, update)


def accumulated_grad_norm(opt_state: Any, grads: Any) -> jax.Array:
    """Global norm of the mean gradient accumulated so far in this micro-step's group, this
    micro-batch included: on the group's last micro-step, the gradient the optimiser applies
    (the loop logs only that one). Without accumulation (k = 1), the norm of `grads`."""
    if not isinstance(opt_state, optax.MultiStepsState):
        return optax.global_norm(grads)
    m = opt_state.mini_step.astype(jnp.float32)
    mean = jax.tree_util.tree_map(lambda a, g: (g + m * a) / (m + 1), opt_state.acc_grads, grads)
    return optax.global_norm(mean)
