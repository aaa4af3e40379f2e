"""Gemma config parsing (both config spellings, Gemma 3 inside a multimodal config) and the
attention kernel choice with a soft-cap. No torch needed."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest

from jaxlora.errors import UserError
from jaxlora.models import attention as attn
from jaxlora.models.config import FULL, SLIDING, config_from_hf

TEXT = dict(
    vocab_size=262208,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=16,
    sliding_window=512,
    query_pre_attn_scalar=16,
)


def test_gemma3_transformers4_spelling_inside_a_multimodal_config():
    """Hub Gemma 3 (4B+) configs: `rope_local_base_freq`, linear scaling of the global layers,
    `sliding_window_pattern` instead of `layer_types`, the text part under `text_config`."""
    raw = {
        "model_type": "gemma3",
        "text_config": {
            **TEXT,
            "model_type": "gemma3_text",
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    cfg = config_from_hf(raw)
    assert cfg.model_type == "gemma3" and cfg.weight_prefix == "model.language_model."
    assert cfg.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 2
    assert cfg.rope_theta == 1e6 and cfg.rope_type == "linear" and cfg.rope["factor"] == 8.0
    assert cfg.rope_local_theta == 1e4
    assert cfg.qk_norm and cfg.tie_word_embeddings and cfg.norm_plus_one and cfg.embed_scale
    assert cfg.attn_logit_softcap is None and cfg.final_logit_softcap is None
    assert cfg.query_pre_attn_scalar == 16 and cfg.sliding_window == 512


def test_gemma2_without_layer_types_alternates_from_sliding():
    raw = {
        **TEXT,
        "model_type": "gemma2",
        "num_hidden_layers": 4,
        "rope_theta": 10000.0,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    cfg = config_from_hf(raw)
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, FULL)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (50.0, 30.0)
    assert cfg.rope_local_theta is None and not cfg.qk_norm and cfg.weight_prefix == "model."
    # 4 norms per layer: input, post-attention, pre- and post-feed-forward.
    d, f, q, kv = 64, 128, 64, 16
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * f + 4 * d
    assert cfg.num_params() == 262208 * d + 4 * per_layer + d


@pytest.mark.parametrize(
    "change,match",
    [
        ({"hidden_activation": "silu"}, "hidden_activation 'silu'"),
        ({"layer_types": ["sliding_attention"]}, "layer_types must list"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_bad_gemma_configs_are_user_errors(change, match):
    with pytest.raises(UserError, match=match):
        config_from_hf({**TEXT, "model_type": "gemma3_text", **change})
    with pytest.raises(UserError, match="text_config"):
        config_from_hf({"model_type": "gemma3"})


def test_softcap_kernel_choice_falls_back_announced(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_announced", set())  # announced once per process otherwise
    # CPU auto: the block kernel takes the cap (T >= 256), dense xla below.
    assert attn.select(attn.AttentionSpec(), 512, jnp.float32, 64, None, 50.0)[0] == "block"
    assert attn.select(attn.AttentionSpec(), 64, jnp.float32, 64, None, 50.0)[0] == "xla"
    # Splash takes the cap (tests/test_flash_kernels.py checks its numbers); the GPU kernels
    # have none: fallback with the reason, logged as a warning.
    spec = attn.AttentionSpec("splash", platform="tpu")
    assert attn.select(spec, 512, jnp.bfloat16, 128, 4096, 50.0)[0] == "splash"
    spec = attn.AttentionSpec("cudnn", platform="gpu")
    kernel, reason = attn.select(spec, 512, jnp.bfloat16, 128, 4096, 50.0)
    assert kernel == "xla" and "cudnn kernel has no attention logit soft-cap" in reason
    spec = attn.AttentionSpec("pallas", interpret=True)
    q = jnp.ones((1, 128, 2, 8))
    caplog.set_level(logging.WARNING, logger="jaxlora.attention")
    seg = jnp.ones((1, 128), jnp.int32)
    attn.attention(q, q, q, scale=0.1, segment_ids=seg, softcap=5.0, spec=spec)
    assert any("soft-cap" in r.getMessage() for r in caplog.records)
