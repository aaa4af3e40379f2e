"""Optimiser and step invariants: schedules = transformers, accumulation = big batch,
frozen base bit-identical, optimiser state only for trainable leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.peft.lora import LoraConfig, init_lora
from jaxlora.train.optim import lr_schedule, make_optimizer
from jaxlora.train.steps import lm_loss_fn, make_train_step


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup", "constant"])
def test_schedule_matches_transformers(kind):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = transformers.get_scheduler(
        kind, opt, num_warmup_steps=7 if kind != "constant" else 0, num_training_steps=50
    )
    ours = lr_schedule(3e-4, kind, 50, 7 if kind != "constant" else 0)
    for step in range(55):
        ref = opt.param_groups[0]["lr"]
        assert abs(float(ours(step)) - ref) <= 1e-9 + 1e-6 * ref, (kind, step)
        opt.step()
        sched.step()


def _batch(rng, b, t, vocab):
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.7).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, t - 3 :] = 0  # some padding
    mask[seg == 0] = 0
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return {"input_ids": ids, "loss_mask": mask, "segment_ids": seg, "positions": pos}


def _setup(model_dir, k):
    model = jaxlora.load_model(model_dir, dtype="float32")
    lcfg = LoraConfig(rank=4, alpha=8)
    lora = init_lora(jax.random.key(0), model.params, lcfg)
    module = model.module(lcfg.spec)
    tx, _ = make_optimizer(
        learning_rate=1e-2,
        scheduler="constant",
        total_steps=10,
        warmup_steps=0,
        weight_decay=0.01,
        accumulation_steps=k,
    )
    step = make_train_step(lm_loss_fn(module, model.config, "lora", None), tx)
    state = {"trainable": lora, "opt_state": tx.init(lora), "rng": jax.random.key(1)}
    return model, step, state


def _scaled(batch, k, group_tokens):
    return {**batch, "loss_scale": np.float32(k / group_tokens)}


def _targets(b):
    return int(b["loss_mask"][:, 1:].sum())


@pytest.mark.slow
def test_accumulation_equals_big_batch_and_base_frozen(tiny_model_dir):
    rng = np.random.default_rng(0)
    full = _batch(rng, 4, 16, 500)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]
    model, step1, s1 = _setup(tiny_model_dir, 1)
    base_before = jax.tree_util.tree_map(np.asarray, model.params)
    s1, m1 = step1(s1, model.params, _scaled(full, 1, _targets(full)))
    _, step2, s2 = _setup(tiny_model_dir, 2)
    n = sum(_targets(h) for h in halves)
    for h in halves:
        s2, _ = step2(s2, model.params, _scaled(h, 2, n))
    diffs = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), s1["trainable"], s2["trainable"]
    )
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
    # The adapter moved (B left zero), the base did not move by a single bit.
    b = s1["trainable"]["layers"]["mlp"]["up_proj"]["lora_b"]
    assert float(jnp.abs(b).max()) > 0
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), model.params, base_before
    )
    # Loss metric is the token-mean NLL.
    assert np.isfinite(float(m1["loss_sum"])) and int(m1["tokens"]) == _targets(full)


def test_optimizer_state_only_for_adapter(tiny_model_dir):
    model, _, state = _setup(tiny_model_dir, 4)
    n_adapter = sum(x.size for x in jax.tree_util.tree_leaves(state["trainable"]))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim > 0)
    # Adam mu + nu + MultiSteps accumulator: 3 floats per adapter parameter, nothing else.
    assert n_state == 3 * n_adapter


def test_nonfinite_micro_batch_keeps_the_accumulation_phase(tiny_model_dir):
    """k = 2: a NaN micro-batch contributes nothing, and the NEXT group is still the next two
    micro-batches (skipping inside MultiSteps would shift every later group by one)."""
    rng = np.random.default_rng(3)
    b1, b2, b3, b4 = (_batch(rng, 2, 16, 500) for _ in range(4))
    model, step, state = _setup(tiny_model_dir, 2)
    _, _, ref = _setup(tiny_model_dir, 2)

    def zero_loss(b):  # a finite micro-batch whose gradient is exactly zero
        return {**b, "loss_scale": np.float32(0.0)}

    state, m = step(state, model.params, {**b1, "loss_scale": np.float32(np.nan)})
    assert not bool(m["finite"])
    for b in (b2, b3, b4):
        state, _ = step(state, model.params, b)
    for b in (zero_loss(b1), b2, b3, b4):
        ref, _ = step(ref, model.params, b)
    assert int(state["opt_state"].mini_step) == 0 == int(ref["opt_state"].mini_step)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7),
        state["trainable"],
        ref["trainable"],
    )


def test_nonfinite_batch_is_skipped(tiny_model_dir):
    rng = np.random.default_rng(0)
    batch = _batch(rng, 2, 16, 500)
    model, step, state = _setup(tiny_model_dir, 1)
    before = jax.tree_util.tree_map(np.asarray, state["trainable"])
    bad = {**batch, "loss_scale": np.float32(np.nan)}
    state, m = step(state, model.params, bad)
    assert not bool(m["finite"]) or not np.isfinite(float(m["grad_norm"]))
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["trainable"], before
    )
