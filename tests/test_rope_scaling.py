"""RoPE scaling parity with transformers' own inverse-frequency functions
(`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`), on configs chosen so the cases that
matter are exercised: Llama-3 scaling with frequencies inside the smoothed (medium) band, not only
the unscaled high and the fully scaled low ones, and dynamic NTK beyond the trained context."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxlora.models.config import config_from_hf
from jaxlora.models.llama import rope_inv_freq

torch = pytest.importorskip("torch")
rope_utils = pytest.importorskip("transformers.modeling_rope_utils")

BASE = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)


def _pair(**kw):
    from transformers import LlamaConfig

    raw = {**BASE, **kw}
    return config_from_hf(raw), LlamaConfig(**raw)


def test_llama3_scaling_inside_the_smoothed_band():
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=1024,
    )
    ours_cfg, hf_cfg = _pair(rope_theta=500000.0, rope_scaling=scaling)
    want, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    got = np.asarray(rope_inv_freq(ours_cfg, 64))
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)  # unscaled inverse frequencies
    wavelen = 2 * math.pi / plain
    old = scaling["original_max_position_embeddings"]
    medium = (wavelen >= old / scaling["high_freq_factor"]) & (
        wavelen <= old / scaling["low_freq_factor"]
    )
    # All three regimes present: unscaled (short), smoothed (medium) and fully scaled (long).
    assert medium.sum() >= 4 and (wavelen < old / 4).sum() >= 4 and (wavelen > old).sum() >= 4
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)


@pytest.mark.parametrize("seq_len", [1024, 4096, 6000, 20000])
def test_dynamic_ntk_matches_transformers(seq_len):
    ours_cfg, hf_cfg = _pair(rope_theta=10000.0, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    want, _ = rope_utils.ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=seq_len)
    got = np.asarray(rope_inv_freq(ours_cfg, seq_len))
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-5)
    if seq_len > BASE["max_position_embeddings"]:  # the base really grew
        plain = 1.0 / 10000.0 ** (np.arange(0, 128, 2) / 128)
        assert got[-1] < 0.9 * plain[-1]
