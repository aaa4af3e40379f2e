"""Prompt tuning and prefix tuning vs PEFT: same logits both ways (PEFT-made adapters loaded
here; ours loaded by `PeftModel.from_pretrained`), and cached generation agrees with the plain
forward. Tiny Qwen2 with grouped-query attention (4 heads, 2 KV heads), fp32."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.evaluate.generate import generate
from jaxlora.io.peft_prompt import check_prompt_fits, save_prompt_adapter
from jaxlora.peft.prompt import PromptAdapter, PromptConfig, init_prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_qwen2 import save_tiny_qwen2  # noqa: E402

IDS = np.random.default_rng(1).integers(0, 97, size=(2, 10))
MASK = np.ones((2, 10), np.int64)
MASK[1, 7:] = 0  # right padding on row 1


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("base"))


def _peft_logits(base, adapter_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits
    return out.numpy()[:, -IDS.shape[1] :]  # PEFT prompt tuning also returns virtual positions


def _assert_close_on_real_tokens(ours, ref):
    for b in range(IDS.shape[0]):
        n = int(MASK[b].sum())
        np.testing.assert_allclose(ours[b, :n], ref[b, :n], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kind",
    [
        "prompt",
        "prefix",
        "prefix_projection",
    ],
)
def test_peft_made_adapter_loads_with_same_logits(base, tmp_path, kind):
    torch.manual_seed(1)
    if kind == "prompt":
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    else:
        cfg = peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=5,
            prefix_projection=kind == "prefix_projection",
            encoder_hidden_size=16,
        )
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), cfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pm.save_pretrained(tmp_path / "a")
    ref = _peft_logits(base, tmp_path / "a")

    model = jaxlora.load_model(base, dtype="float32")
    adapter = jaxlora.load_adapter(tmp_path / "a")
    assert isinstance(adapter, PromptAdapter) and adapter.config.num_virtual_tokens == 5
    check_prompt_fits(adapter, model.config)
    ours = np.asarray(model.logits(IDS, adapter, segment_ids=MASK))
    _assert_close_on_real_tokens(ours, ref)
    plain = np.asarray(model.logits(IDS, segment_ids=MASK))
    assert np.abs(plain - ours).max() > 1e-2  # the virtual tokens do change the model


@pytest.mark.parametrize(
    "pcfg",
    [
        PromptConfig("prompt_tuning", num_virtual_tokens=4),
        PromptConfig("prefix_tuning", num_virtual_tokens=3),
        PromptConfig("prefix_tuning", num_virtual_tokens=3, prefix_projection=True),
    ],
    ids=["prompt", "prefix", "prefix_projection"],
)
def test_our_adapter_loads_in_peft_with_same_logits(base, tmp_path, pcfg):
    model = jaxlora.load_model(base, dtype="float32")
    tree = init_prompt(jax.random.key(0), model.params, model.config, pcfg, init_ids=None)
    tree = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), tree
    )
    adapter = PromptAdapter(tree, pcfg)
    save_prompt_adapter(adapter, model.config, tmp_path / "ours", str(base))
    ref = _peft_logits(base, tmp_path / "ours")
    ours = np.asarray(model.logits(IDS, adapter, segment_ids=MASK))
    _assert_close_on_real_tokens(ours, ref)
    # Reloaded here (a reparameterised prefix comes back as its output): same logits.
    again = np.asarray(model.logits(IDS, jaxlora.load_adapter(tmp_path / "ours"), segment_ids=MASK))
    np.testing.assert_allclose(again, ours, atol=1e-5)


def test_prompt_init_from_text_uses_token_embeddings(base):
    model = jaxlora.load_model(base, dtype="float32")
    tree = init_prompt(
        jax.random.key(0), model.params, model.config, PromptConfig("prompt_tuning", 5), [7, 9]
    )
    table = np.asarray(model.params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(tree["prompt_embeddings"]), table[[7, 9, 7, 9, 7]])


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_cached_generation_with_virtual_tokens_matches_forward(base, method):
    """Greedy decoding (prefill + KV-cache steps, left padding) = argmax of the plain forward."""
    model = jaxlora.load_model(base, dtype="float32")
    pcfg = PromptConfig(method, num_virtual_tokens=3)
    tree = init_prompt(jax.random.key(2), model.params, model.config, pcfg)
    tree = jax.tree_util.tree_map(lambda x: x * 20.0, tree)  # strong enough to steer
    adapter = PromptAdapter(tree, pcfg)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    out = generate(model, prompts, adapter=adapter, max_new_tokens=4, stop_token_ids=())
    width = 12  # one padded shape: the reference forward compiles once
    for p, new in zip(prompts, out, strict=True):
        seq = list(p)
        for _ in range(4):
            ids = np.zeros((1, width), np.int64)
            ids[0, : len(seq)] = seq
            seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
            logits = np.asarray(model.logits(ids, adapter, segment_ids=seg))
            seq.append(int(np.argmax(logits[0, len(seq) - 1])))
        assert new == seq[len(p) :]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_adapter_for_another_model_is_refused_by_name(base, method):
    from jaxlora.errors import UserError
    from jaxlora.io.peft import check_adapter_fits

    model = jaxlora.load_model(base, dtype="float32")
    tree = init_prompt(jax.random.key(0), model.params, model.config, PromptConfig(method, 2))
    check_adapter_fits(PromptAdapter(tree, PromptConfig(method, 2)), model.params, "ok")
    wrong = jax.tree_util.tree_map(lambda x: x[:, :-1], tree)
    with pytest.raises(UserError, match=f"other: {method} vectors have width"):
        check_adapter_fits(PromptAdapter(wrong, PromptConfig(method, 2)), model.params, "other")
