"""Optimiser, train state and the jitted train / eval steps for a run.

Why this file exists: turning (config, model parts, stage, an example batch) into the compiled
step is the same for `jaxlora train`, `jaxlora bench` and the benchmarks, and it is where the
pjit model lives: in/out shardings of state, frozen weights and batch, donation of the state,
and the mesh context the model's activation constraints need. The output (`Steps`) is data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from jaxlora.config import Config
from jaxlora.losses.fused_ce import fused_ce_positions
from jaxlora.parallel import sharding
from jaxlora.train.methods import trainable_logical
from jaxlora.train.model_parts import ModelParts
from jaxlora.train.optim import make_optimizer, warmup_steps_for
from jaxlora.train.steps import make_eval_step, make_train_step


@dataclasses.dataclass
class Steps:
    tx: Any  # optax transform (masked AdamW + schedule + clipping + MultiSteps)
    schedule: Callable[[int], Any]  # learning rate at optimiser step i
    state: dict  # {"trainable", "opt_state", "rng", ...}, placed in `state_shardings`
    state_shardings: dict
    train_step: Callable  # (state, frozen, batch) -> (state, metrics); `.lower(...)` for AOT
    eval_step: Callable  # (trainable, frozen, batch) -> metric sums


def _mesh_of(*trees: Any) -> Any:
    for tree in trees:
        for leaf in jax.tree_util.tree_leaves(tree):
            if isinstance(leaf, jax.sharding.NamedSharding):
                return leaf.mesh
    raise ValueError("no NamedSharding found to take the mesh from")


def train_step_jit_kwargs(
    state_shardings: Any, frozen_shardings: Any, batch_shardings: Any
) -> dict:
    """`jax.jit` kwargs for `steps.make_train_step`: step(state, frozen, batch) -> (state, metrics).

    The state comes back in its own shardings (so its donated buffers are reused); metrics are
    scalars, replicated.
    """
    rep = sharding.replicated(_mesh_of(state_shardings, batch_shardings))
    return {
        "in_shardings": (state_shardings, frozen_shardings, batch_shardings),
        "out_shardings": (state_shardings, rep),
    }


def eval_step_jit_kwargs(
    trainable_shardings: Any, frozen_shardings: Any, batch_shardings: Any
) -> dict:
    """`jax.jit` kwargs for `steps.make_eval_step`: eval(trainable, frozen, batch) -> metrics."""
    rep = sharding.replicated(_mesh_of(trainable_shardings, batch_shardings))
    return {
        "in_shardings": (trainable_shardings, frozen_shardings, batch_shardings),
        "out_shardings": rep,
    }


def trainable_shardings(parts: ModelParts, tree: Any) -> Any:
    """Shardings of a trainable tree: adapters follow their base kernels' logical axes."""
    if parts.mode == "lora":
        return sharding.adapter_shardings(parts.mesh, tree, parts.param_logical)
    if parts.mode in ("prompt", "adapter"):  # small trees: every device holds them all
        rep = sharding.replicated(parts.mesh)
        return jax.tree_util.tree_map(lambda _: rep, tree)
    logical = trainable_logical(parts.param_logical, tree)
    return sharding.param_shardings(parts.mesh, logical, tree)


def build_optimizer(cfg: Config, parts: ModelParts, total_steps: int) -> tuple[Any, Callable]:
    t, f = cfg.train, cfg.finetune
    warm = warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio)
    return make_optimizer(
        learning_rate=t.learning_rate,
        scheduler=t.lr_scheduler_type,
        total_steps=total_steps,
        warmup_steps=warm,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        accumulation_steps=t.gradient_accumulation_steps,
        b1=t.adam_beta1,
        b2=t.adam_beta2,
        eps=t.adam_epsilon,
        loraplus_lr_ratio=f.loraplus_lr_ratio if parts.mode == "lora" else None,
    )


def build_steps(
    cfg: Config,
    parts: ModelParts,
    stage: Any,
    example: dict,
    total_steps: int,
    right_padded: bool = False,
) -> Steps:
    """Optimiser + initial state (consumes `parts.trainable`) and the jitted steps, specialised
    for batches shaped like `example` (a host batch with `loss_scale`). `right_padded`: every
    batch row is one sample then padding (unpacked data), which lets `attention: auto` use
    cuDNN on a GPU (models/attention.py); the model's own spec (generation: left padding)
    keeps the default."""
    tx, schedule = build_optimizer(cfg, parts, total_steps)
    state, state_sh = sharding.init_train_state(
        parts.mesh,
        tx,
        parts.trainable,
        trainable_shardings(parts, parts.trainable),
        cfg.train.seed + 1,
    )
    parts.trainable = None  # the state owns it now (and donates it at every step)
    model, spec = parts.model, parts.adapter_spec
    attn = dataclasses.replace(model.attention, right_padded=right_padded)
    # LM head + loss chunks (sequence positions): the backend's fp32-logits budget for THIS
    # device's rows; inside the jitted step the batch axis is global, so decide it here.
    chunk = fused_ce_positions(cfg.train.per_device_train_batch_size, model.config.vocab_size, None)
    train_module = model.module(
        spec,
        deterministic=not (spec and spec.dropout > 0),
        remat=cfg.model.remat,
        scan_unroll=1 if cfg.model.scan_layers else model.config.num_hidden_layers,
        attention=attn,
    )
    train_loss = stage.loss_fn(train_module, chunk)
    eval_loss = stage.loss_fn(model.module(spec, attention=attn), chunk)

    mesh = parts.mesh
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, parts.frozen)
    batch_sh = sharding.batch_shardings(mesh, example)
    train_kw = train_step_jit_kwargs(state_sh, frozen_sh, batch_sh)
    eval_batch_sh = {k: v for k, v in batch_sh.items() if k != "loss_scale"}
    eval_kw = eval_step_jit_kwargs(state_sh["trainable"], frozen_sh, eval_batch_sh)
    step = make_train_step(train_loss, tx, **train_kw)
    evaluate = make_eval_step(eval_loss, **eval_kw)

    # The model's activation sharding constraints apply only under the mesh context.
    def train_step(state, frozen, batch):
        with sharding.mesh_context(mesh):
            return step(state, frozen, batch)

    def eval_step(trainable, frozen, batch):
        with sharding.mesh_context(mesh):
            return evaluate(trainable, frozen, batch)

    # The pre-flight memory check compiles ahead of time; JAX keeps that executable in-process
    # (lowering and compilation caches), so the first step of the same shape does not compile
    # again: the check costs no compile when it runs at a shape the loop will use.
    def lower(*args):
        with sharding.mesh_context(mesh):
            return step.lower(*args)

    train_step.lower = lower
    train_step.jitted = step  # `bench --lower-for` exports it for another platform
    return Steps(tx, schedule, state, state_sh, train_step, eval_step)
