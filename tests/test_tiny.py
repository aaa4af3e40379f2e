"""The tiny demo model/tokenizer: HF-compatible files, byte-level round trip, cached default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlora.io import tiny

TEXTS = ["Hello, world!", "你好，我是 JaxLoRA 助手。", "emoji 🙂 and tabs\tand\n\nnewlines", "ÿ€"]


@pytest.mark.parametrize("tok_fixture", ["chatml_tokenizer", "llama3_tokenizer"])
def test_tokenizer_round_trips_any_text(tok_fixture, request):
    tok = request.getfixturevalue(tok_fixture)
    assert 500 <= len(tok) <= 1000
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_chatml_template_renders_system_and_generation_prompt(chatml_tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    text = chatml_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = chatml_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(chatml_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert chatml_tokenizer.eos_token == "<|im_end|>"
    assert chatml_tokenizer.pad_token == "<|endoftext|>"


def test_llama3_template(llama3_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = llama3_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
    )
    assert llama3_tokenizer.eos_token == "<|eot_id|>"
    assert llama3_tokenizer.bos_token == "<|begin_of_text|>"


def test_tokenizer_is_deterministic():
    a = tiny.build_tokenizer(None, template="chatml")
    b = tiny.build_tokenizer(None, template="chatml")
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_make_tiny_model_files(tmp_path, family):
    out = tiny.make_tiny_model(tmp_path, family=family, head_dim=32 if family == "qwen3" else None)
    cfg = json.loads((out / "config.json").read_text())
    w = load_file(str(out / "model.safetensors"))
    assert cfg["model_type"] == family
    v, d = cfg["vocab_size"], cfg["hidden_size"]
    dh = 32 if family == "qwen3" else d // cfg["num_attention_heads"]
    assert w["model.embed_tokens.weight"].shape == (v, d)
    assert w["lm_head.weight"].shape == (v, d)
    assert w["model.layers.1.self_attn.q_proj.weight"].shape == (4 * dh, d)  # [out, in]
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (2 * dh, d)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (d, 128)
    np.testing.assert_array_equal(w["model.norm.weight"], np.ones(d, np.float32))
    assert ("model.layers.0.self_attn.q_proj.bias" in w) == (family == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in w) == (family == "qwen3")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == v
    assert cfg["eos_token_id"] == tok.eos_token_id
    assert cfg["pad_token_id"] == tok.pad_token_id


def test_tied_and_bf16(tmp_path):
    out = tiny.make_tiny_model(
        tmp_path, tie_word_embeddings=True, dtype="bfloat16", vocab_size=1024
    )
    w = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in w
    assert str(w["model.embed_tokens.weight"].dtype) == "bfloat16"
    assert w["model.embed_tokens.weight"].shape[0] == 1024


@pytest.mark.torch
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_transformers_loads_it(tmp_path, family):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out = tiny.make_tiny_model(tmp_path, family=family, template="llama3")
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == family
    sd = model.state_dict()
    w = load_file(str(out / "model.safetensors"))
    for k, a in w.items():
        np.testing.assert_array_equal(sd[k].numpy(), a)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_default_model_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path))
    first = tiny.default_model_dir()
    assert first.parent == tmp_path and first.name.startswith(f"tiny-{tiny.TINY_VERSION}-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny.default_model_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["hidden_size"] == tiny.DEFAULT_MODEL_KWARGS["hidden_size"]


def test_cli_script(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"
    out = tmp_path / "m"
    args = [sys.executable, str(script), str(out), "--family", "qwen2", "--hidden-size", "32"]
    res = subprocess.run(args, capture_output=True, text=True, check=True)
    assert res.stdout.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 32
