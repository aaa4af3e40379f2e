"""LoRA on Gemma 2 / Gemma 3 against PEFT: PEFT loads our adapter with the same logits, one
training step's loss and LoRA gradients equal PEFT's (the soft-capped fused loss included), and
the merged export loads in transformers with the adapted logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_gemma_parity import ROWS, save_gemma

import jaxlora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter(model, rank=2):
    from jaxlora.peft.lora import Adapter, LoraConfig, init_lora

    lcfg = LoraConfig(rank=rank, alpha=4.0, targets=TARGETS)
    tree = init_lora(jax.random.key(0), model.params, lcfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    tree = jax.tree_util.tree_unflatten(  # non-zero B: the adapter changes the model
        treedef,
        [
            0.2 * jax.random.normal(k, x.shape) if p[-1].key == "lora_b" else x
            for k, (p, x) in zip(keys, leaves, strict=True)
        ],
    )
    return Adapter(tree, lcfg)


def _peft_grad(pm, name: str) -> np.ndarray:
    for n, p in pm.named_parameters():
        if n.endswith(name):
            return p.grad.numpy()
    raise KeyError(name)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3"])
def test_lora_matches_peft_and_merged_export(tmp_path, family):
    from jaxlora.io.export import export_adapter, export_merged
    from jaxlora.io.peft import load_peft_adapter
    from jaxlora.train.steps import lm_loss_fn

    tm = save_gemma(tmp_path / "base", family)
    model = jaxlora.load_model(tmp_path / "base", dtype="float32")
    adapter = _adapter(model)
    export_adapter(adapter, tmp_path / "adapter", base_model=None, model_config=model.config)
    back = load_peft_adapter(tmp_path / "adapter")
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, adapter.params)

    ids = ROWS
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    valid = mask.astype(bool)
    ours = np.asarray(model.logits(ids, adapter, segment_ids=mask))
    assert np.abs(ours - np.asarray(model.logits(ids, segment_ids=mask)))[valid].max() > 1e-2

    pm = peft.PeftModel.from_pretrained(tm, tmp_path / "adapter", is_trainable=True).eval()
    labels = np.where(mask == 1, ids, -100)
    out = pm(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        labels=torch.tensor(labels),
    )
    assert np.abs(out.logits.detach().numpy() - ours)[valid].max() <= 1e-4
    out.loss.backward()

    loss = lm_loss_fn(model.module(adapter.spec), model.config, "lora", None)
    n_targets = float(mask[:, 1:].sum())
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape),
        "segment_ids": jnp.asarray(mask, jnp.int32),
        "loss_mask": jnp.asarray(mask, jnp.int32),
        "loss_scale": jnp.float32(1.0 / n_targets),
    }
    (value, _), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        adapter.params, model.params, batch, jax.random.key(0)
    )
    assert abs(float(value) - out.loss.item()) <= 1e-5
    worst, biggest = 0.0, 0.0
    layers = grads["layers"]
    for block, projs in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])):
        for proj in projs:
            for i in range(model.config.num_hidden_layers):
                stem = f"layers.{i}.{block}.{proj}"
                for ours_key, peft_key in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                    want = _peft_grad(pm, f"{stem}.{peft_key}.default.weight").T
                    got = np.asarray(layers[block][proj][ours_key][i])
                    worst = max(worst, float(np.abs(got - want).max()))
                    biggest = max(biggest, float(np.abs(want).max()))
    assert worst <= 1e-4, worst
    assert biggest > 1e-3  # gradients are not all ~0

    # Merged export: transformers loads it (Gemma 3: with its vision tower) with our logits.
    export_merged(tmp_path / "base", tmp_path / "merged", adapter=adapter)
    cls = transformers.AutoModelForCausalLM
    if family == "gemma3":
        cls = transformers.Gemma3ForConditionalGeneration
    merged = cls.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        got = merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    assert np.abs(got.numpy() - ours)[valid].max() <= 1e-4
    if family == "gemma3":  # the vision tower came through unchanged
        for n, p in tm.named_parameters():
            if "vision_tower" in n:
                torch.testing.assert_close(merged.get_parameter(n), p, rtol=0, atol=0)
