"""Fine-tuning methods without a torch reference: full (fp32 master or bf16 + fp32 state), freeze
(per-layer slices of the stacked layers), LoRA+ partition, PiSSA invariants, adapter on adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.io.peft import save_peft_adapter
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, init_pissa, pissa_factors
from jaxlora.train import methods, steps
from jaxlora.train.methods import LayerSlice, adapter_for_export, params_for_export, split_trainable
from jaxlora.train.optim import make_optimizer

IDS = np.arange(1, 25)[None]
F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def _cfg(model_dir, **kw):
    return config_from_dict(dict(model_name_or_path=str(model_dir), **kw))


def _batch(seed=0, b=2, t=16):
    ids = np.random.default_rng(seed).integers(0, 500, (b, t)).astype(np.int32)
    return {
        "input_ids": ids,
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape),
        "loss_scale": np.float32(1 / (b * (t - 1))),
    }


def _step(model, split, lr=1e-2):
    tx, _ = make_optimizer(learning_rate=lr, scheduler="constant", total_steps=4, warmup_steps=0)
    loss = steps.lm_loss_fn(model.module(split.adapter_spec), model.config, split.mode, None)
    state = {"trainable": split.trainable, "opt_state": tx.init(split.trainable),
             "rng": jax.random.key(0)}  # fmt: skip
    return steps.make_train_step(loss, tx), state


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return jaxlora.load_model(tiny_model_dir, dtype="float32")


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


# ----------------------------------------------------------------------------- full


@pytest.mark.slow
def test_full_bf16_weights_keep_fp32_optimizer_state(tiny_model_dir, model):
    split = split_trainable(_cfg(tiny_model_dir, finetuning_type="full"), model.params)
    assert split.mode == "full" and split.frozen == {}
    assert {x.dtype for x in jax.tree_util.tree_leaves(split.trainable)} == {F32}
    cfg = _cfg(tiny_model_dir, finetuning_type="full", full_precision_master=False, bf16=True)
    split = split_trainable(cfg, model.params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(split.trainable)} == {BF16}
    step, state = _step(model, split, lr=1e-3)
    floats = [x for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim > 0]
    assert {x.dtype for x in floats} == {F32}  # Adam mu, nu and accumulator
    before = _host(split.trainable)
    state, m = step(state, {}, _batch())
    assert bool(m["finite"])
    after = state["trainable"]
    assert {x.dtype for x in jax.tree_util.tree_leaves(after)} == {BF16}
    assert {x.dtype for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim} == {F32}
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
    assert all(v for k, v in _slices(moved).items() if not k.endswith("scale")), moved
    # The documented bf16-without-master limitation: norm scales sit at 1.0, where a 1e-3
    # Adam step is below half a bf16 ulp (2^-8), so they do not move at this learning rate.
    assert not any(v for k, v in _slices(moved).items() if k.endswith("scale"))


# ----------------------------------------------------------------------------- freeze


def _slices(tree):
    return {
        "/".join(str(getattr(k, "key", "")) for k in kp if hasattr(k, "key")): leaf
        for kp, leaf in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, LayerSlice)
        )[0]
    }


def test_freeze_selection_follows_llamafactory(tiny_model_dir, model):
    def sel(layers, modules):
        cfg = _cfg(
            tiny_model_dir,
            finetuning_type="freeze",
            freeze_trainable_layers=layers,
            freeze_trainable_modules=modules,
        )
        return _slices(split_trainable(cfg, model.params).trainable)

    last = sel(1, "all")  # the last layer, every leaf of it
    assert {s.start for s in last.values()} == {1}
    assert all(s.value.shape[0] == 1 for s in last.values())
    assert "layers/input_layernorm/scale" in last and "layers/mlp/up_proj/kernel" in last
    first = sel(-1, "mlp,q_proj")  # negative: the first |n| layers
    assert set(first) == {
        "layers/mlp/gate_proj/kernel",
        "layers/mlp/up_proj/kernel",
        "layers/mlp/down_proj/kernel",
        "layers/self_attn/q_proj/kernel",
    }
    assert {s.start for s in first.values()} == {0}
    both = sel(5, "post_attention_layernorm,lm_head")  # n > L: all layers; + a whole module
    assert both["layers/post_attention_layernorm/scale"].value.shape[0] == 2
    assert both["lm_head/kernel"].shape == model.params["lm_head"]["kernel"].shape
    with pytest.raises(UserError, match="did you mean `self_attn`"):
        sel(1, "self_atn")


@pytest.mark.slow
def test_freeze_trains_only_selected_layers(tiny_model_dir, model, monkeypatch):
    # The freeze forward re-inserts the slices (the `steps.variables_for` diff, applied here).
    monkeypatch.setattr(steps, "variables_for", methods.model_variables)
    cfg = _cfg(
        tiny_model_dir,
        finetuning_type="freeze",
        freeze_trainable_layers=1,
        freeze_trainable_modules="mlp,self_attn",
    )
    split = split_trainable(cfg, model.params)
    assert split.frozen is model.params
    step, state = _step(model, split)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(state["trainable"]))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state["opt_state"]) if x.ndim)
    assert n_state == 2 * n_train  # Adam mu + nu (k = 1: no accumulator), trained slices only
    original = _host(model.params)
    for i in range(2):
        state, _ = step(state, split.frozen, _batch(i))
    full = _host(params_for_export(split, state["trainable"]))
    for kp, new in jax.tree_util.tree_flatten_with_path(full)[0]:
        path = "/".join(k.key for k in kp)
        old = original
        for k in kp:
            old = old[k.key]
        selected = path.startswith(("layers/mlp", "layers/self_attn"))
        if path.startswith("layers/"):
            np.testing.assert_array_equal(new[0], old[0], err_msg=path)  # layer 0: bit-identical
            if selected:
                assert np.any(new[1] != old[1]), path
            else:
                np.testing.assert_array_equal(new[1], old[1], err_msg=path)
        else:
            np.testing.assert_array_equal(new, old, err_msg=path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, _host(split.frozen), original)


# ----------------------------------------------------------------------------- LoRA+


def test_loraplus_b_and_magnitude_updates_are_ratio_times_a():
    x = jnp.ones((2, 3, 4), jnp.float32)
    tree = {"layers": {"mlp": {"up_proj": {"lora_a": x, "lora_b": x, "magnitude": x}}}}
    g = jax.random.normal(jax.random.key(0), x.shape)
    grads = jax.tree_util.tree_map(lambda _: g, tree)  # identical gradients everywhere
    for ratio in (None, 16.0):
        tx, _ = make_optimizer(
            learning_rate=1e-3,
            scheduler="constant",
            total_steps=10,
            warmup_steps=0,
            max_grad_norm=None,
            loraplus_lr_ratio=ratio,
        )
        state = tx.init(tree)
        for _ in range(2):  # also after Adam's moments have history
            upd, state = tx.update(grads, state, tree)
            node = upd["layers"]["mlp"]["up_proj"]
            a = np.asarray(node["lora_a"])
            assert np.abs(a).max() > 0
            for fast in ("lora_b", "magnitude"):
                np.testing.assert_allclose(np.asarray(node[fast]), (ratio or 1.0) * a, rtol=1e-6)


# ----------------------------------------------------------------------------- PiSSA


def test_pissa_randomized_svd_and_invariants(tiny_model_dir, model):
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    v, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    w = jnp.asarray((u[:, :32] * 0.7 ** np.arange(32)) @ v.T, jnp.float32)  # decaying spectrum
    exact = pissa_factors(w, 4, 2.0, 0, jax.random.key(0))
    approx = pissa_factors(w, 4, 2.0, 16, jax.random.key(1))  # the default pissa_iter
    np.testing.assert_allclose(exact[0] @ exact[1], approx[0] @ approx[1], atol=1e-4)
    # 2.0 * A @ B is the best rank-4 approximation (Eckart-Young): the residual's norm is the
    # norm of the discarded singular values.
    resid = np.linalg.norm(np.asarray(w) - 2.0 * np.asarray(exact[0] @ exact[1]))
    np.testing.assert_allclose(resid, np.linalg.norm(0.7 ** np.arange(4, 32)), rtol=1e-4)

    # Whole model, randomized, with DoRA and rsLoRA: residual + adapter is the original model.
    cfg = _cfg(
        tiny_model_dir,
        pissa_init=True,
        pissa_iter=2,
        use_dora=True,
        use_rslora=True,
        lora_target="q_proj,down_proj",
        lora_rank=4,
    )
    split = split_trainable(cfg, model.params)
    assert split.initial_adapter is not None and split.lora_config.init == "pissa"
    resid = jaxlora.Model(model.config, split.frozen, dtype=jnp.float32)
    start = resid.logits(IDS, Adapter(split.trainable, split.lora_config))
    np.testing.assert_allclose(np.asarray(start), np.asarray(model.logits(IDS)), atol=1e-4)
    # Export conversion at step 0 is a no-op adapter on the original base (A·B - A0·B0 = 0).
    exported = adapter_for_export(split, split.trainable)
    assert exported.config.rank == 8 and exported.config.scale == split.lora_config.scale
    np.testing.assert_allclose(
        np.asarray(model.logits(IDS, exported)), np.asarray(model.logits(IDS)), atol=1e-4
    )
    # bf16 base: the residual keeps the kernel dtype.
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), model.params)
    lcfg = LoraConfig(rank=4, alpha=8, targets=("up_proj",), init="pissa")
    _, res = init_pissa(jax.random.key(0), bf16, lcfg)
    assert res["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- adapter on adapter


def test_training_continues_from_an_existing_adapter(tiny_model_dir, model, tmp_path):
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"), use_dora=True)
    params = init_lora(jax.random.key(0), model.params, lcfg)
    noisy = jax.tree_util.tree_map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params
    )
    save_peft_adapter(Adapter(noisy, lcfg), tmp_path / "a", base_model=str(tiny_model_dir))
    cfg = _cfg(
        tiny_model_dir, adapter_name_or_path=str(tmp_path / "a"), lora_rank=16, lora_dropout=0.1
    )
    split = split_trainable(cfg, model.params)
    # The adapter's own settings win; dropout is this run's.
    c = split.lora_config
    assert (c.rank, c.alpha, c.use_dora, c.targets) == (4, 8.0, True, lcfg.targets)
    assert c.dropout == 0.1 and split.initial_adapter is None
    loaded = jaxlora.load_adapter(tmp_path / "a")
    step0 = np.asarray(model.logits(IDS, Adapter(split.trainable, split.lora_config)))
    np.testing.assert_allclose(step0, np.asarray(model.logits(IDS, loaded)), atol=1e-6)
    assert np.abs(step0 - np.asarray(model.logits(IDS))).max() > 1e-3
    assert adapter_for_export(split, split.trainable).params is split.trainable
