"""HF checkpoint loading: clear errors for bad directories; config spellings; compile count."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxlora
from jaxlora.errors import UserError
from jaxlora.io.hf import abstract_params, save_params_hf
from jaxlora.io.model import _forward_fn
from jaxlora.models.config import config_from_hf

RAW = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def _write_random(d, raw=RAW):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw))
    cfg = config_from_hf(raw)
    shapes, _ = abstract_params(cfg)
    rng = np.random.default_rng(0)
    import jax

    params = jax.tree_util.tree_map(
        lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes
    )
    save_params_hf(params, cfg, d, dtype=np.float32)
    return cfg, params


def test_roundtrip_save_load(tmp_path):
    cfg, params = _write_random(tmp_path / "m")
    model = jaxlora.load_model(tmp_path / "m", dtype="float32")
    k = model.params["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k), params["layers"]["self_attn"]["q_proj"]["kernel"])
    assert model.tokenizer is None


def test_missing_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        jaxlora.load_model(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        jaxlora.load_model(tmp_path / "nope")


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**RAW, "model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not supported.*llama, mistral"):
        jaxlora.load_model(tmp_path)


def test_pickle_only_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RAW))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(UserError, match="convert to safetensors|Convert to safetensors"):
        jaxlora.load_model(tmp_path)


def test_missing_tensor_named(tmp_path):
    _write_random(tmp_path / "m")
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(UserError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxlora.load_model(tmp_path / "m")


def test_shape_mismatch_named(tmp_path):
    _write_random(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**RAW, "intermediate_size": 40}))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight has shape"):
        jaxlora.load_model(tmp_path / "m")


def test_old_and_new_rope_spellings_agree():
    old = {**RAW, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    new = {**RAW, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}
    a, b = (
        config_from_hf({**old, "torch_dtype": "bfloat16"}),
        config_from_hf({**new, "dtype": "bfloat16"}),
    )
    assert a == b and a.rope_theta == 5e5 and a.rope_type == "llama3"
    with pytest.raises(UserError, match="rope_type 'yarn' is not supported"):
        config_from_hf({**RAW, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_logits_traced_once_per_shape(tmp_path):
    _write_random(tmp_path / "m")
    model = jaxlora.load_model(tmp_path / "m", dtype="float32")
    fn = _forward_fn(model.config, model.dtype, None, model.attention)
    before = fn._cache_size()
    ids = np.zeros((2, 8), np.int32)
    for i in range(4):
        model.logits(ids + i)  # numpy in
        model.logits(jaxlora.io.model.jnp.asarray(ids))  # jax in
    assert fn._cache_size() - before == 1


def test_abstract_params_traced_once_per_config_and_dtype():
    """A run asks for the param shapes 2-3 times: the init is traced once per (config, dtype),
    and each caller gets its own dicts (a caller's edit never reaches the next one)."""
    import jax
    import jax.numpy as jnp

    from jaxlora.io import hf

    cfg = config_from_hf(RAW)
    hf._cached_abstract_params.cache_clear()
    shapes, logical = abstract_params(cfg)
    shapes["extra"] = 1
    logical["layers"].clear()
    again, again_logical = abstract_params(cfg)
    assert "extra" not in again and again_logical["layers"]
    assert hf._cached_abstract_params.cache_info().hits == 1
    bf16, _ = abstract_params(cfg, jnp.bfloat16)
    assert hf._cached_abstract_params.cache_info().misses == 2
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    assert jax.tree.map(lambda x: x.shape, bf16) == jax.tree.map(lambda x: x.shape, again)
