"""Numerics of the training loop that a loss curve alone would not reveal.

- The logged `train/grad_norm` with gradient accumulation is the norm of the gradient the
  optimiser applies (the group's accumulated mean), i.e. equal to the norm logged by a k = 1 run
  over the same rows in one batch.
- `optax.MultiSteps` (and its fp32 gradient accumulator) exists only when k > 1.
- `loss_scale` (k / group tokens) checked with plain SGD, where a k-times error in the gradient
  is a k-times error in the update (Adam normalises it away).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from jaxlora.config import config_from_dict
from jaxlora.train.loop import train


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory):
    from jaxlora.io.tiny import MICRO_MODEL, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("num-model"), **MICRO_MODEL, embed_std=0.1)


def _run(model, out, **kw):
    base = dict(
        model_name_or_path=str(model),
        dataset="demo:identity_sft",
        cutoff_len=32,
        max_samples=16,
        learning_rate=1e-3,
        lora_rank=4,
        logging_steps=1,
        save_steps=100,
        max_steps=2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        seed=3,
        bf16=False,
        output_dir=str(out),
    )
    train(config_from_dict({**base, **kw}), progress=False, log=lambda s: None)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "train/loss" in r]


@pytest.mark.slow
def test_logged_grad_norm_is_the_applied_accumulated_gradient(micro_model, tmp_path):
    big = _run(micro_model, tmp_path / "k1", per_device_train_batch_size=4)
    acc = _run(
        micro_model, tmp_path / "k4", per_device_train_batch_size=1, gradient_accumulation_steps=4
    )
    # Same rows per optimiser step (the losses agree), so the same applied gradient.
    np.testing.assert_allclose(acc[0]["train/loss"], big[0]["train/loss"], rtol=1e-5)
    for a, b in zip(acc, big, strict=True):
        np.testing.assert_allclose(a["train/grad_norm"], b["train/grad_norm"], rtol=1e-4)


def test_multisteps_only_with_accumulation():
    from jaxlora.train.optim import make_optimizer

    params = {"w": np.zeros((3, 5), np.float32)}
    kw = dict(learning_rate=1e-3, scheduler="constant", total_steps=10, warmup_steps=0)
    one = make_optimizer(**kw, accumulation_steps=1)[0].init(params)
    four = make_optimizer(**kw, accumulation_steps=4)[0].init(params)

    def floats(state):
        return sum(x.size for x in jax.tree_util.tree_leaves(state) if np.ndim(x) > 0)

    assert not isinstance(one, optax.MultiStepsState) and floats(one) == 2 * 15  # Adam mu, nu
    assert isinstance(four, optax.MultiStepsState) and floats(four) == 3 * 15  # + accumulator


def test_nonfinite_update_is_skipped_without_accumulation():
    """k = 1 (no MultiSteps): a NaN gradient changes neither the weights nor the state."""
    from jaxlora.train.optim import make_optimizer

    tx = make_optimizer(learning_rate=0.1, scheduler="constant", total_steps=10, warmup_steps=0)[0]
    p = {"w": np.ones(4, np.float32)}
    s = tx.init(p)
    u, s2 = tx.update({"w": np.array([1.0, np.nan, 0, 0], np.float32)}, s, p)
    assert np.all(np.asarray(u["w"]) == 0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), s2, s)
    u, s3 = tx.update({"w": np.ones(4, np.float32)}, s2, p)
    assert np.all(np.asarray(u["w"]) < 0)


@pytest.mark.slow
def test_loss_scale_with_plain_sgd(micro_model, tmp_path, monkeypatch):
    """The trainer's own batches (`loss_scale` = k / group targets) and step, with plain SGD in
    place of AdamW: after one optimiser step of k = 3 micro-batches the adapter moved by exactly
    -lr * (gradient of the group's summed token NLL) / (group's target tokens). With Adam a
    k-times error in the scale is nearly invisible; with SGD it is a k-times longer step."""
    from jaxlora.train import setup, step_setup
    from jaxlora.train.optim import zero_nonfinite_gradients

    lr, k = 0.5, 3
    sgd = zero_nonfinite_gradients(optax.MultiSteps(optax.sgd(lr), every_k_schedule=k))
    monkeypatch.setattr(step_setup, "build_optimizer", lambda *a: (sgd, lambda s: lr))
    cfg = dict(
        model_name_or_path=str(micro_model),
        dataset="demo:identity_sft",
        cutoff_len=32,
        max_samples=16,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=k,
        lora_rank=4,
        max_steps=1,
        seed=3,
        bf16=False,
        output_dir=str(tmp_path / "run"),
    )
    run = setup.build_run(config_from_dict(cfg), log=lambda s: None)
    try:
        state = run.steps.state
        # B starts at zero (no gradient into A): give it random values so every leaf moves.
        state["trainable"] = jax.tree_util.tree_map_with_path(
            lambda kp, x: (
                0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)
                if "lora_b" in jax.tree_util.keystr(kp)
                else x
            ),
            state["trainable"],
        )
        start = jax.tree_util.tree_map(np.asarray, state["trainable"])
        batches = [run.batches.batch(m) for m in range(k)]
        loss_fn = run.stage.loss_fn(run.parts.model.module(run.parts.adapter_spec), 64)
        frozen = run.parts.frozen

        def group_nll(tr):  # summed token NLL of the k micro-batches, no scale
            out = [
                loss_fn(tr, frozen, {**b, "loss_scale": 1.0}, jax.random.key(0)) for b in batches
            ]
            return sum(o[1][0] for o in out), sum(o[1][1] for o in out)

        grad, tokens = jax.jit(jax.grad(group_nll, has_aux=True))(start)  # jit: one compile
        for b in batches:
            state, _ = run.steps.train_step(state, frozen, b)
        moved = jax.tree_util.tree_map(lambda a, b: np.asarray(a) - b, state["trainable"], start)
        want = jax.tree_util.tree_map(lambda g: -lr * np.asarray(g) / float(tokens), grad)
        jax.tree_util.tree_map(
            lambda m, w: np.testing.assert_allclose(m, w, rtol=2e-4, atol=1e-8), moved, want
        )
        assert max(float(np.abs(m).max()) for m in jax.tree_util.tree_leaves(moved)) > 1e-4
    finally:
        run.close()


def test_preflight_says_unknown_without_memory_analysis():
    """A backend whose compiled step has no memory analysis: the summary says "unknown" (it
    used to report 0 GiB needed and pass as if it had checked)."""
    from jaxlora.train import preflight

    class Compiled:
        def memory_analysis(self):
            return None

    class Step:
        def lower(self, *args):
            return self

        def compile(self):
            return Compiled()

    est = preflight.estimate(Step())
    assert est.needed_bytes is None and est.fits()
    assert "unknown" in est.summary() and "0.00 GiB" not in est.summary()


def test_qlora_without_remat_warns():
    from jaxlora.train.preflight import config_warnings

    base = dict(model_name_or_path="tiny", dataset="demo:identity_sft", quantization_bit=4)
    warned = config_warnings(config_from_dict(base))
    assert len(warned) == 1 and "remat: full" in warned[0]
    assert config_warnings(config_from_dict({**base, "remat": "full"})) == []
    assert config_warnings(config_from_dict({**base, "quantization_bit": None})) == []


def test_out_of_memory_advice_names_the_next_remat_step():
    from jaxlora.train.preflight import advice

    def tips(remat):
        return advice(config_from_dict(dict(model_name_or_path="tiny", remat=remat)))

    assert "remat: dots_no_batch" in tips("none") and "or full" in tips("none")
    assert "remat: full" in tips("dots_no_batch") and "dots_no_batch" not in tips("dots_no_batch")
    assert "remat:" not in tips("full")
