"""Packing and rematerialisation leave the maths unchanged: a packed row gives the same
per-sample log-probs and gradients as the samples run separately; every remat policy and the
unrolled layer loop give the same loss and gradients. Plus continued pre-training end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.losses import masked_lm_loss, token_logprobs
from jaxlora.models.llama import head_weight
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from jaxlora.io.tiny import make_tiny_model

    d = make_tiny_model(tmp_path_factory.mktemp("pack"), embed_std=0.1)
    return jaxlora.load_model(d, dtype="float32")


def _adapter(model):
    lcfg = LoraConfig(rank=4, alpha=8)
    params = init_lora(jax.random.key(0), model.params, lcfg)
    params = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.ones_like(x), params)
    return Adapter(params, lcfg)


@pytest.mark.slow
def test_packed_row_equals_separate_samples(model):
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, 500, 11), rng.integers(1, 500, 7)
    ad = _adapter(model)
    pad = 3
    ids = np.concatenate([a, b, np.zeros(pad, int)])[None]
    seg = np.array([[1] * 11 + [2] * 7 + [0] * pad])
    pos = np.array([list(range(11)) + list(range(7)) + [0] * pad])

    # The loss (summed token NLL) with the per-token log-probs as aux: one jit'd program per row
    # shape gives both (run eagerly, each op of the scanned model compiles on its own).
    def loss(lora_params, ids, pos, seg, mask):
        module = model.module(ad.spec)
        h = module.apply(
            {"params": model.params, "lora": lora_params}, ids, pos, seg, return_hidden=True
        )
        head, vm = head_weight(model.params, model.config)
        s, _ = masked_lm_loss(h, head, ids, mask, seg, vocab_major=vm)
        return s, token_logprobs(h, head, ids, vocab_major=vm)

    grad = jax.jit(jax.grad(loss, has_aux=True))
    mask = (seg > 0).astype(np.int32)
    g_packed, packed = grad(ad.params, ids, pos, seg, mask)
    packed = np.asarray(packed)[0]
    g_sep = None
    for x, lo in ((a, 0), (b, 11)):
        one = np.ones((1, len(x)), np.int32)
        g, alone = grad(ad.params, x[None], np.arange(len(x))[None], one, one)
        # Log-probs: the packed row's = each sample's alone.
        np.testing.assert_allclose(packed[lo : lo + len(x) - 1], np.asarray(alone)[0], atol=1e-5)
        g_sep = g if g_sep is None else jax.tree_util.tree_map(jnp.add, g_sep, g)
    # Gradients: the packed loss equals the sum of the separate losses (token sums).
    jax.tree_util.tree_map(
        lambda p, q: np.testing.assert_allclose(p, q, atol=1e-5, rtol=1e-4), g_packed, g_sep
    )


@pytest.mark.parametrize("remat", ["none", "full"])
def test_block_attention_in_the_model_equals_dense(model, monkeypatch, remat):
    """The CPU block-causal attention (custom VJP) inside the scanned, packed model: same loss and
    adapter gradients as dense attention."""
    from jaxlora.models import attention

    ad = _adapter(model)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 500, (2, 24))
    seg = np.array([[1] * 9 + [2] * 12 + [0] * 3, [1] * 24])
    pos = np.array([list(range(9)) + list(range(12)) + [0] * 3, list(range(24))])
    mask = (seg > 0).astype(np.int32)

    def loss(lora_params):
        module = model.module(ad.spec, remat=remat)
        h = module.apply(
            {"params": model.params, "lora": lora_params}, ids, pos, seg, return_hidden=True
        )
        head, vm = head_weight(model.params, model.config)
        return masked_lm_loss(h, head, ids, mask, seg, vocab_major=vm)[0]

    results = []
    for block in (1 << 30, 5):  # dense, then blocks of 5 query rows
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", block)
        results.append(jax.jit(jax.value_and_grad(loss))(ad.params))
    (v_dense, g_dense), (v_block, g_block) = results
    np.testing.assert_allclose(v_block, v_dense, rtol=1e-6)
    jax.tree_util.tree_map(
        lambda p, q: np.testing.assert_allclose(p, q, atol=1e-6, rtol=1e-5), g_block, g_dense
    )


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_and_unroll_do_not_change_gradients(model, remat):
    ad = _adapter(model)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 500, (2, 16))
    pos = np.broadcast_to(np.arange(16), (2, 16))
    seg = np.ones((2, 16), int)

    def loss(lora_params, **kw):
        module = model.module(ad.spec, **kw)
        h = module.apply(
            {"params": model.params, "lora": lora_params}, ids, pos, seg, return_hidden=True
        )
        head, vm = head_weight(model.params, model.config)
        return masked_lm_loss(h, head, ids, seg, seg, vocab_major=vm)[0]

    ref_v, ref_g = jax.value_and_grad(loss)(ad.params)
    for kw in ({"remat": remat}, {"remat": remat, "scan_unroll": 2}):
        v, g = jax.value_and_grad(lambda p, kw=kw: loss(p, **kw))(ad.params)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-6), g, ref_g)


@pytest.mark.slow
def test_continued_pretraining_on_text(model, tmp_path):
    from jaxlora.config import config_from_dict
    from jaxlora.train.loop import train

    text = tmp_path / "corpus.txt"
    lines = [
        f"The number {i} is followed by {i + 1}, and {i + 1} comes after {i}." for i in range(200)
    ]
    text.write_text("\n".join(lines))
    out = tmp_path / "pt"
    cfg = config_from_dict(
        dict(
            model_name_or_path=str(model.path),
            stage="pt",
            dataset=str(text),
            cutoff_len=64,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            lora_rank=8,
            max_steps=12,
            logging_steps=2,
            save_steps=100,
            bf16=False,
            output_dir=str(out),
            val_size=0.1,
            eval_steps=6,
        )
    )
    train(cfg, progress=False, log=lambda s: None)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    report = json.loads((out / "data_report.json").read_text())
    assert report["packing"] is True and report["n_train_rows"] < report["n_train"]
