"""LoRA semantics and PEFT interop: zero-init is a no-op, merge = adapter, PEFT logits agree."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import UserError
from jaxlora.io.hf import save_params_hf
from jaxlora.io.peft import save_peft_adapter
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, merge, parse_targets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_qwen2 import save_tiny_qwen2  # noqa: E402

IDS = np.random.default_rng(1).integers(0, 97, size=(2, 10))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("base"))


def _random_adapter(model, lcfg, seed=0):
    params = init_lora(jax.random.key(seed), model.params, lcfg)
    # Non-zero B so the adapter actually changes the logits.
    return Adapter(
        jax.tree_util.tree_map(
            lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), params
        ),
        lcfg,
    )


def test_zero_init_adapter_is_noop_and_merge_matches(base):
    model = jaxlora.load_model(base, dtype="float32")
    lcfg = LoraConfig(rank=4, alpha=8, targets=parse_targets("all"))
    zero = Adapter(init_lora(jax.random.key(0), model.params, lcfg), lcfg)
    np.testing.assert_array_equal(model.logits(IDS, zero), model.logits(IDS))
    ad = _random_adapter(model, lcfg)
    with_adapter = np.asarray(model.logits(IDS, ad))
    assert np.abs(with_adapter - np.asarray(model.logits(IDS))).max() > 1e-3
    merged = jaxlora.Model(model.config, merge(model.params, ad), dtype=model.dtype)
    np.testing.assert_allclose(merged.logits(IDS), with_adapter, atol=1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("rslora", [False, True])
def test_export_loads_in_peft_and_merged_in_transformers(base, tmp_path, rslora):
    model = jaxlora.load_model(base, dtype="float32")
    lcfg = LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), use_rslora=rslora)
    ad = _random_adapter(model, lcfg)
    ours = np.asarray(model.logits(IDS, ad))
    save_peft_adapter(ad, tmp_path / "adapter", base_model=str(base))
    tm = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    pm = peft.PeftModel.from_pretrained(tm, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    # Merged export: a plain HF checkpoint with the adapter folded in.
    save_params_hf(merge(model.params, ad), model.config, tmp_path / "merged", dtype=np.float32)
    (tmp_path / "merged" / "config.json").write_text((base / "config.json").read_text())
    mm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref2 = mm(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ours - ref2).max() <= 1e-4
    # And our loader reads our own export back identically.
    again = jaxlora.load_adapter(tmp_path / "adapter")
    np.testing.assert_allclose(model.logits(IDS, again), ours, atol=1e-6)


@pytest.mark.torch
def test_peft_made_adapter_loads(base, tmp_path):
    tm = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    pcfg = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
        init_lora_weights=False,  # random B: a non-trivial adapter
    )
    pm = peft.get_peft_model(tm, pcfg).eval()
    pm.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    model = jaxlora.load_model(base, dtype="float32")
    ad = jaxlora.load_adapter(tmp_path / "p")
    assert ad.config.targets == ("k_proj", "o_proj", "gate_proj", "up_proj")
    assert np.abs(np.asarray(model.logits(IDS, ad)) - ref).max() <= 1e-4


def test_bad_targets_and_adapter_dirs(tmp_path):
    with pytest.raises(UserError, match="did you mean `q_proj`"):
        parse_targets("q_prj,v_proj")
    with pytest.raises(UserError, match="no adapter_config.json"):
        jaxlora.load_adapter(tmp_path)
