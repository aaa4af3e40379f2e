"""Logits parity against transformers' PyTorch implementation on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest

import jaxlora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

BASE = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

CASES = {
    "llama3_untied": (
        "LlamaConfig",
        dict(
            head_dim=16,  # != 48 / 4
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            rope_theta=500000.0,
        ),
    ),
    "llama_tied_bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True)),
    "llama_linear_rope": (
        "LlamaConfig",
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, mlp_bias=True),
    ),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "mistral_window": ("MistralConfig", dict(head_dim=16, sliding_window=5)),
}


def _save_torch_model(tmp_path, config_cls, overrides, dtype=torch.float32):
    cfg = getattr(transformers, config_cls)(**BASE, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():  # random norms so a wrong norm placement cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BASE["vocab_size"], size=(2, 12))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    config_cls, overrides = CASES[case]
    torch_model = _save_torch_model(tmp_path, config_cls, overrides)
    ids, mask = _batch()
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()
    model = jaxlora.load_model(tmp_path, dtype="float32")
    got = np.asarray(model.logits(ids, segment_ids=mask))
    valid = mask.astype(bool)
    err = np.abs(got - ref)[valid].max()
    assert err <= 1e-4, f"{case}: max |Δlogits| = {err}"


def test_bf16_checkpoint_and_sharded_index(tmp_path):
    torch_model = _save_torch_model(tmp_path / "m", "LlamaConfig", {}, dtype=torch.bfloat16)
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, _ = _batch()
    with torch.no_grad():
        ref = torch_model.float()(input_ids=torch.tensor(ids)).logits.numpy()
    for d in ("m", "sharded"):
        model = jaxlora.load_model(tmp_path / d, dtype="float32")
        got = np.asarray(model.logits(ids))
        # bf16 weights upcast exactly, so fp32 compute matches the upcast torch model.
        assert np.abs(got - ref).max() <= 1e-4
    bf16 = jaxlora.load_model(tmp_path / "sharded", dtype="bfloat16")
    assert bf16.params["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.dtype("bfloat16")
    assert np.abs(np.asarray(bf16.logits(ids)) - ref).max() < 0.1
