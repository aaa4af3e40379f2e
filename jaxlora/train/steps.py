"""Jitted train and eval steps for causal-LM training (SFT and continued pre-training).

A step is a free function over plain pytrees:

    state  = {"trainable": tree, "opt_state": optax state, "rng": key}   (donated)
    frozen = base params for LoRA, {} for full fine-tuning                 (never differentiated)
    batch  = {"input_ids", "loss_mask", "segment_ids", "positions": [B, T] int32,
              "loss_scale": [] f32 = k / target tokens in this optimiser step's k micro-batches}

Gradients are taken w.r.t. `state["trainable"]` only, so frozen weights have no gradient, no
optimiser slot and no accumulator. Metrics stay on device; the loop fetches them at logging steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora.losses import masked_lm_loss
from jaxlora.models.config import ModelConfig
from jaxlora.models.llama import Decoder, head_weight
from jaxlora.train.optim import accumulated_grad_norm


def variables_for(mode: str, trainable: Any, frozen: Any) -> dict:
    """Model variables from the trainable/frozen split ("lora" / "prompt": base + the trained
    collection; "freeze": the slices written into the base; "full": the params)."""
    from jaxlora.train.methods import model_variables

    return model_variables(mode, trainable, frozen)


def merge_trees(base: dict, update: dict) -> dict:
    """Nested dict union; `update` wins on shared leaves."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_trees(base[k], v) if isinstance(v, dict) and k in base else v
    return out


def lm_loss_fn(
    module: Decoder, cfg: ModelConfig, mode: str, chunk_size: int | None
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, jax.Array]]]:
    """loss(trainable, frozen, batch, rng) -> (scaled loss, (loss_sum, n_tokens[, metrics])).

    Mixture-of-experts models also return the router load-balancing loss of the batch
    (metrics "moe/aux_loss" and "moe/batches" = 1, summed by the loop into a mean per batch);
    it is added to the loss as `router_aux_loss_coef * aux_loss` when the model config has
    `output_router_logits` (transformers' semantics; `moe_aux_loss_coef` in the run config turns
    it on). Each micro-batch adds its own term, so accumulation averages them, as HF does."""
    moe = cfg.num_experts > 0

    def loss(trainable, frozen, batch, rng):
        variables = variables_for(mode, trainable, frozen)
        out = module.apply(
            variables,
            batch["input_ids"],
            batch["positions"],
            batch["segment_ids"],
            return_hidden=True,
            return_aux_loss=moe,
            rngs={"dropout": rng},
        )
        hidden, aux = out if moe else (out, None)  # [B, T, D], [] fp32
        head, vocab_major = head_weight(variables["params"], cfg)  # [V, D] or [D, V]
        loss_sum, n = masked_lm_loss(
            hidden,
            head,
            batch["input_ids"],
            batch["loss_mask"],
            batch["segment_ids"],
            chunk_size=chunk_size,
            logit_softcap=cfg.final_logit_softcap,
            vocab_major=vocab_major,
        )
        scaled = loss_sum * batch.get("loss_scale", 1.0)
        if not moe:
            return scaled, (loss_sum, n)
        if cfg.output_router_logits:
            scaled = scaled + cfg.router_aux_loss_coef * aux
        return scaled, (loss_sum, n, {"moe/aux_loss": aux, "moe/batches": jnp.float32(1.0)})

    return loss


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, **jit_kwargs) -> Callable:
    """step(state, frozen, batch) -> (state, metrics); `state` is donated."""

    def train_step(state, frozen, batch):  # the name XLA's compile log and RunClock count
        rng, sub = jax.random.split(state["rng"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, aux), grads = grad_fn(state["trainable"], frozen, batch, sub)
        loss_sum, n_tokens = aux[0], aux[1]
        grad_norm = accumulated_grad_norm(state["opt_state"], grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
        trainable = optax.apply_updates(state["trainable"], updates)
        finite = jnp.isfinite(loss_sum) & jnp.isfinite(optax.global_norm(grads))
        metrics = {
            "loss_sum": loss_sum,
            "tokens": n_tokens,
            "grad_norm": grad_norm,
            "finite": finite,
            **{k: v for k, v in (aux[2] if len(aux) > 2 else {}).items()},
        }
        return {"trainable": trainable, "opt_state": opt_state, "rng": rng}, metrics

    return jax.jit(train_step, donate_argnums=(0,), **jit_kwargs)


def make_eval_step(loss_fn: Callable, **jit_kwargs) -> Callable:
    """eval(trainable, frozen, batch) -> metrics (sums; the loop divides by token counts)."""

    def eval_step(trainable, frozen, batch):
        _, aux = loss_fn(trainable, frozen, batch, jax.random.key(0))
        out = {"loss_sum": aux[0], "tokens": aux[1]}
        if len(aux) > 2:
            out.update(aux[2])
        return out

    return jax.jit(eval_step, **jit_kwargs)
