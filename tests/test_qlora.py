"""QLoRA: the base is quantised while loading (NF4 / int8, projection kernels only), LoRA / DoRA /
PiSSA work on top of it, a QLoRA run learns, and its merged export uses the original weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.config import config_from_dict
from jaxlora.models import quant
from jaxlora.models.linear import dora_column_norm
from jaxlora.peft.lora import (
    Adapter,
    LoraConfig,
    dense_kernel,
    init_lora,
    kernel_dims,
    kernel_shape,
)
from jaxlora.train.methods import load_base_model, quantizing_transform, split_trainable

IDS = np.arange(1, 33)[None]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = {
    n: "self_attn" if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp" for n in PROJ
}


def _cfg(model_dir, **kw):
    return config_from_dict(dict(model_name_or_path=str(model_dir), **kw))


def _kernels(params):
    for block in ("self_attn", "mlp"):
        for name, node in params["layers"][block].items():
            if "kernel" in node:
                yield name, node["kernel"]


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return jaxlora.load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def nf4(tiny_model_dir):
    return load_base_model(_cfg(tiny_model_dir, quantization_bit=4), tiny_model_dir, jnp.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_while_loading(tiny_model_dir, base, bits, monkeypatch):
    """Kernels are loaded one layer [in, out] at a time (never a dense [L, in, out] stack on
    device) and quantised there; embeddings, norms and lm_head stay as loaded; the per-layer
    quantiser stacked equals quantising the stack on the host."""
    from jaxlora.io import hf

    made = []
    real = jax.make_array_from_callback

    def spy(shape, *a, **kw):
        made.append(tuple(shape))
        return real(shape, *a, **kw)

    monkeypatch.setattr(hf.jax, "make_array_from_callback", spy)
    model = load_base_model(_cfg(tiny_model_dir, quantization_bit=bits), tiny_model_dir, "bfloat16")
    monkeypatch.undo()
    assert made and all(len(s) <= 2 for s in made), made  # norms [L, D]; no [L, in, out]
    names = [n for n, k in _kernels(model.params) if quant.is_quantized(k)]
    assert sorted(names) == sorted(PROJ)
    assert {quant.quant_kind(k) for _, k in _kernels(model.params)} == {
        "nf4" if bits == 4 else "int8"
    }
    assert model.params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert model.params["lm_head"]["kernel"].dtype == jnp.bfloat16
    assert model.params["norm"]["scale"].dtype == jnp.bfloat16
    for name, k in _kernels(model.params):
        dense = np.asarray(base.params["layers"][BLOCK[name]][name]["kernel"])
        assert kernel_shape(k) == dense.shape and kernel_dims(k) == dense.shape
        stacked = quant.quantize_np(dense.astype(jnp.bfloat16), bits)
        for key in stacked:
            np.testing.assert_array_equal(np.asarray(k[key]), stacked[key])


def test_transform_leaves_non_kernels_alone():
    t = quantizing_transform(4)
    assert t(("embed_tokens", "embedding")) is None
    assert t(("lm_head", "kernel")) is None
    assert t(("layers", "self_attn", "q_proj", "bias")) is None
    q = t(("layers", "mlp", "up_proj", "kernel"))(jnp.ones((8, 4)))
    assert quant.is_quantized(q) and q["nf4_codes"].shape == (4, 4)


@pytest.mark.parametrize("bits, ratio, err", [(4, 0.3, 0.2), (8, 0.55, 0.02)])
def test_memory_falls_and_logits_stay_close(tiny_model_dir, base, bits, ratio, err):
    model = load_base_model(_cfg(tiny_model_dir, quantization_bit=bits), tiny_model_dir, "bfloat16")
    bf16 = load_base_model(_cfg(tiny_model_dir), tiny_model_dir, "bfloat16")
    q_bytes = sum(quant.nbytes(k) for _, k in _kernels(model.params))
    b_bytes = sum(quant.nbytes(k) for _, k in _kernels(bf16.params))
    assert q_bytes <= ratio * b_bytes, (q_bytes, b_bytes)
    model.dtype = jnp.float32
    ref = np.asarray(base.logits(IDS))
    got = np.asarray(model.logits(IDS))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < err


def test_lora_dora_and_pissa_on_quantised_base(tiny_model_dir, nf4):
    """kernel_dims / init / DoRA magnitude / PiSSA all work on NF4 dicts, layer by layer."""
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"), use_dora=True)
    ad = init_lora(jax.random.key(0), nf4.params, lcfg)
    k = nf4.params["layers"]["mlp"]["down_proj"]["kernel"]
    node = ad["layers"]["mlp"]["down_proj"]
    want = dora_column_norm(dense_kernel(k), node["lora_a"], node["lora_b"], lcfg.scale)
    np.testing.assert_allclose(node["magnitude"], want, rtol=1e-6)
    # Zero-B DoRA on a quantised base is the quantised model.
    np.testing.assert_allclose(nf4.logits(IDS, Adapter(ad, lcfg)), nf4.logits(IDS), atol=1e-5)
    # PiSSA: the residual is re-quantised with the kernel's settings; residual + adapter is
    # the dequantised model up to the (smaller) quantisation error of the residual.
    split = split_trainable(
        _cfg(
            tiny_model_dir,
            quantization_bit=4,
            pissa_init=True,
            pissa_iter=0,
            lora_rank=8,
            lora_target="up_proj",
        ),
        nf4.params,
    )
    res = split.frozen["layers"]["mlp"]["up_proj"]["kernel"]
    assert quant.quant_kind(res) == "nf4"
    assert jax.tree_util.tree_map(jnp.shape, res) == jax.tree_util.tree_map(
        jnp.shape, nf4.params["layers"]["mlp"]["up_proj"]["kernel"]
    )
    model = jaxlora.Model(nf4.config, split.frozen, dtype=jnp.float32)
    start = np.asarray(model.logits(IDS, Adapter(split.trainable, split.lora_config)))
    ref = np.asarray(nf4.logits(IDS))
    assert np.linalg.norm(start - ref) / np.linalg.norm(ref) < 0.1


@pytest.mark.slow
def test_qlora_trains_and_merged_export_uses_original_weights(tiny_model_dir, base, nf4, tmp_path):
    """Loss falls when training LoRA on the NF4 base; the merged export re-reads the
    un-quantised base from disk and folds the adapter into it (not into the NF4 weights)."""
    from jaxlora.io.export import export_merged
    from jaxlora.train.optim import make_optimizer
    from jaxlora.train.steps import lm_loss_fn, make_train_step

    split = split_trainable(
        _cfg(tiny_model_dir, quantization_bit=4, lora_rank=8),
        nf4.params,
    )
    assert split.frozen is nf4.params
    tx, _ = make_optimizer(learning_rate=1e-2, scheduler="constant", total_steps=12, warmup_steps=0)
    module = nf4.module(split.adapter_spec)
    step = make_train_step(lm_loss_fn(module, nf4.config, "lora", None), tx)
    state = {"trainable": split.trainable, "opt_state": tx.init(split.trainable),
             "rng": jax.random.key(0)}  # fmt: skip
    ids = np.random.default_rng(0).integers(0, 500, (4, 24)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "loss_mask": np.ones_like(ids),
        "segment_ids": np.ones_like(ids),
        "positions": np.broadcast_to(np.arange(24, dtype=np.int32), ids.shape),
        "loss_scale": np.float32(1 / (4 * 23)),
    }
    losses = []
    for _ in range(12):
        state, m = step(state, split.frozen, batch)
        losses.append(float(m["loss_sum"]) / float(m["tokens"]))
    assert losses[-1] < losses[0] - 0.3, losses
    ad = Adapter(state["trainable"], split.lora_config)
    export_merged(tiny_model_dir, tmp_path / "merged", adapter=ad)
    merged = jaxlora.load_model(tmp_path / "merged", dtype="float32")
    want = np.asarray(base.logits(IDS, ad))  # original fp32 weights + adapter
    np.testing.assert_allclose(np.asarray(merged.logits(IDS)), want, atol=1e-4)
    assert np.abs(np.asarray(nf4.logits(IDS, ad)) - want).max() > 1e-3  # NF4 base differs
