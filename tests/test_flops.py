"""FLOP accounting (jaxlora/flops.py) against the worked numbers in research/performance.md §2.4."""

from __future__ import annotations

import pytest

from jaxlora.bench import flops
from jaxlora.errors import UserError
from jaxlora.models.config import config_from_hf

LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY = {  # the CPU peer-baseline model (research/peer-baseline.md)
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}


@pytest.fixture(scope="module")
def llama8b():
    return config_from_hf(LLAMA3_8B)


def test_matmul_and_lora_params_llama3_8b(llama8b):
    # N = 32 x (q 4096^2 + k,v 2 x 4096 x 1024 + o 4096^2 + mlp 3 x 4096 x 14336) + head 4096 x V
    assert flops.matmul_params(llama8b) == 7_504_658_432
    assert flops.lora_params(llama8b, 16) == 41_943_040  # 41.9M, performance.md §2.4


@pytest.mark.parametrize(
    "seq, lora_gflop, full_gflop",
    [(2048, 31.9, 46.6), (4096, 33.5, 48.3), (8192, 36.7, 51.5)],
)
def test_worked_numbers_causal(llama8b, seq, lora_gflop, full_gflop):
    lora = flops.training_flops_per_token(llama8b, mode="lora", seq_len=seq, lora_rank=16)
    full = flops.training_flops_per_token(llama8b, mode="full", seq_len=seq)
    assert lora.per_token / 1e9 == pytest.approx(lora_gflop, rel=0.01)
    assert full.per_token / 1e9 == pytest.approx(full_gflop, rel=0.01)
    assert lora.formula == "4N + 3A_f + 6P_r" and full.formula == "6N + 3A_f"


def test_noncausal_matches_maxtext_v6e_log(llama8b):
    # MaxText v6e-8 log: 413.433 TFLOP/s / 7138.89 tok/s = 57.913 GFLOP/token, non-causal S=8192.
    full = flops.training_flops_per_token(llama8b, mode="full", seq_len=8192, causal=False)
    assert full.per_token / 1e9 == pytest.approx(413.433e12 / 7138.89 / 1e9, rel=1e-3)


def test_packing_counts_only_within_document_pairs(llama8b):
    # Two documents of 2048 in a 4096 row: S_eff = (2 x 2048^2) / 4096 = 2048.
    assert flops.effective_seq_len(doc_lens=[2048, 2048]) == 2048
    packed = flops.training_flops_per_token(llama8b, doc_lens=[2048, 2048, 0])
    plain = flops.training_flops_per_token(llama8b, seq_len=2048)
    assert packed.per_token == plain.per_token
    assert packed.attn_fwd == 2 * 2048 * 32 * 128 * 32


def test_dpo_adds_reference_forward_unless_cached(llama8b):
    sft = flops.training_flops_per_token(llama8b, seq_len=4096)
    dpo = flops.training_flops_per_token(llama8b, seq_len=4096, stage="dpo")
    cached = flops.training_flops_per_token(
        llama8b, seq_len=4096, stage="dpo", dpo_reference="cached"
    )
    assert dpo.per_token - sft.per_token == pytest.approx(2 * sft.n_matmul + sft.attn_fwd)
    assert cached.per_token == sft.per_token
    full_dpo = flops.training_flops_per_token(llama8b, mode="full", seq_len=4096, stage="dpo")
    assert full_dpo.per_token == pytest.approx(8 * sft.n_matmul + 4 * sft.attn_fwd)


def test_tiny_peer_model_counts():
    cfg = config_from_hf(TINY)
    assert flops.lora_params(cfg, 16) == 1_196_032  # PEFT's trainable count (peer-baseline.md)
    # N_mm in peer-baseline.md (39,985,664) also counts the 8,704 RMSNorm weights.
    assert flops.matmul_params(cfg) == 39_985_664 - 8_704
    qv = flops.lora_params(cfg, 8, ("q_proj", "v_proj"))
    assert qv == 8 * 8 * ((512 + 512) + (512 + 256))


def test_sliding_window_caps_attention():
    cfg = config_from_hf({**TINY, "model_type": "mistral", "sliding_window": 128})
    a = flops.training_flops_per_token(cfg, seq_len=4096).attn_fwd
    assert a == 2 * 128 * 512 * 8


def test_peaks_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("TPU v5 lite") == 197e12
    assert flops.peak_flops("TPU v5p") == 459e12
    assert flops.peak_flops("TPU v6 lite") == 918e12
    assert flops.peak_flops("cpu") == flops.PEAK_FLOPS["cpu"]
    assert flops.peak_flops("some new chip") is None
    assert flops.mfu(10_000, 33.5e9, 989e12) == pytest.approx(0.3387, rel=1e-3)
    assert flops.mfu(10_000, 33.5e9, None) is None


def test_bad_inputs_raise_user_error(llama8b):
    with pytest.raises(UserError, match="mode"):
        flops.training_flops_per_token(llama8b, mode="qlora2", seq_len=8)
    with pytest.raises(UserError, match="seq_len"):
        flops.training_flops_per_token(llama8b)
    with pytest.raises(UserError, match="targets"):
        flops.lora_params(llama8b, 8, ("qkv",))
    with pytest.raises(UserError, match="dpo_reference"):
        flops.training_flops_per_token(llama8b, seq_len=8, stage="dpo", dpo_reference="x")
