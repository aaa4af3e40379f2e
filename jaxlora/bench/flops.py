"""Model FLOPs per trained token, and MFU, for the benchmarks and the training logs.

Why this file exists: "tokens/s" alone does not say how close a run is to the hardware, and
published MFU figures use several accountings (see shared/research/performance.md §2). jaxlora
counts *model* FLOPs (what the maths needs, not what remat or padding adds) the way MaxText and
Megatron-Bridge do, with the LoRA rule written out:

    N    = parameters that take part in a weight matmul, per token: every q/k/v/o/gate/up/down
           kernel of every layer plus the LM head (d x V, also when tied to the embedding). The
           embedding lookup is a gather and counts 0; norms, biases and RoPE are not matmuls.
    A_f  = attention-core forward FLOPs per token, counted causally:
           QK^T and PV are each 2 * S * (H * Dh) multiply-adds per token per layer without a mask
           (4 * S * H * Dh together); a causal mask keeps half the pairs, so
           A_f = 2 * S_eff * (H * Dh) * L.  With packing, S_eff = sum(len_i^2) / sum(len_i) over
           the packed documents (no cross-document pairs), so a row of many short samples is
           charged only for the pairs it really attends.
    P_r  = LoRA parameters (A and B of every adapted kernel).

    full fine-tuning   6N + 3A_f            fwd 2N + A_f; bwd 4N + 2A_f (dX and dW)
    LoRA (frozen base) 4N + 3A_f + 6P_r     fwd 2N + A_f + 2P_r; bwd 2N (dX only) + 2A_f + 4P_r
    DPO                policy cost above + reference forward 2N + A_f on the same tokens,
                       or nothing extra when reference log-probs are cached (precomputed).

The attention core keeps its full 3x in LoRA because it has no weights: its whole backward is
needed to reach the adapters below it. Remat recomputation is NOT counted (model FLOPs, not
hardware FLOPs), so turning remat on lowers MFU, as it should.

MFU = tokens/s x FLOPs per token / peak FLOP/s of the device (dense bf16; `PEAK_FLOPS`).
Worked check (tests/test_flops.py): Llama-3-8B at S=4096 causal gives 33.5 GFLOP/token for LoRA
r=16 on all linears and 48.3 for full fine-tuning, as in performance.md §2.4.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxlora.errors import UserError
from jaxlora.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (no 2:4 sparsity). Sources: performance.md §1 (NVIDIA spec
# sheets halved for sparsity; Cloud TPU pages). Keys are matched against `device_kind`.
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,  # same GH100 compute die as the H100
    "a100": 312e12,
    "v5e": 197e12,  # "TPU v5 lite"
    "v5p": 459e12,
    "v6e": 918e12,  # "TPU v6 lite" (Trillium)
    # This project's 2-core shared CPU (AMD EPYC Zen 4, AVX-512 BF16, no AMX): best JAX 0.12
    # bf16 2048^2 matmul measured by `jaxlora.bench.measure.measure_matmul_peak`
    # (benchmarks/RESULTS.md).
    # CPUs differ too much for a table value to mean much elsewhere: `jaxlora bench` measures
    # the matmul peak of the machine it runs on and reports both ratios.
    "cpu": 0.45e12,
}

# device_kind substrings (lower case) -> PEAK_FLOPS key, most specific first.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("cpu", "cpu"),
)

# Per-layer linear modules: name -> (in features, out features) as functions of the config.
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each per-layer projection of a Llama-family block. Mixture of experts: the
    MLP projections as the k experts a token is routed to (width k x moe_intermediate_size),
    i.e. the ACTIVE weights per token, which is what the FLOPs count."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    if cfg.num_experts:
        f = cfg.num_experts_per_tok * cfg.moe_intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {
        "q_proj": (d, q),
        "k_proj": (d, kv),
        "v_proj": (d, kv),
        "o_proj": (q, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def matmul_params(cfg: ModelConfig) -> int:
    """N: weights used in matmuls per token = all layer projections + the LM head (d x V);
    MoE: the router (d x E) and the k active experts' projections."""
    per_layer = sum(i * o for i, o in linear_shapes(cfg).values())
    per_layer += cfg.hidden_size * cfg.num_experts  # MoE router; 0 for dense models
    lm_head = cfg.hidden_size * cfg.vocab_size  # the head matmul runs even when tied
    return cfg.num_hidden_layers * per_layer + lm_head


def lora_params(cfg: ModelConfig, rank: int, targets: Sequence[str] = _LINEARS) -> int:
    """P_r: A [in, r] + B [r, out] for every targeted projection of every layer."""
    shapes = linear_shapes(cfg)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise UserError(f"lora targets {unknown} are not projections of this model: {_LINEARS}")
    return cfg.num_hidden_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def effective_seq_len(seq_len: int | None = None, doc_lens: Sequence[int] | None = None) -> float:
    """S_eff for the attention term: `seq_len`, or sum(len^2)/sum(len) over packed documents."""
    if doc_lens is not None:
        lens = [int(x) for x in doc_lens if int(x) > 0]
        if not lens:
            raise UserError("doc_lens must contain at least one positive length")
        return sum(x * x for x in lens) / sum(lens)
    if seq_len is None or seq_len < 1:
        raise UserError(f"seq_len must be a positive integer, got {seq_len!r}")
    return float(seq_len)


def attention_fwd_flops(cfg: ModelConfig, s_eff: float, *, causal: bool = True) -> float:
    """A_f per token: QK^T + PV over all layers; causal keeps half of the S x S pairs."""
    width = cfg.num_attention_heads * cfg.head_dim  # H * Dh (query heads; GQA shares K/V only)
    if cfg.sliding_window is not None:
        s_eff = min(s_eff, float(cfg.sliding_window))  # at most `window` keys per query
    per_layer = (2.0 if causal else 4.0) * s_eff * width
    return per_layer * cfg.num_hidden_layers


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """Per-token training FLOPs and the terms they came from."""

    per_token: float
    n_matmul: int  # N
    attn_fwd: float  # A_f
    lora: int  # P_r (0 for full fine-tuning)
    formula: str  # human-readable, e.g. "4N + 3A_f + 6P_r"


def training_flops_per_token(
    cfg: ModelConfig,
    *,
    mode: str = "lora",
    seq_len: int | None = None,
    doc_lens: Sequence[int] | None = None,
    lora_rank: int = 16,
    lora_targets: Sequence[str] = _LINEARS,
    stage: str = "sft",
    dpo_reference: str = "forward",
    causal: bool = True,
) -> FlopCount:
    """Model FLOPs per trained token (see the module docstring for the formulas).

    mode: "lora" (frozen base + adapters) or "full"/"freeze" (weights trained; freeze is charged
    as full, an upper bound). stage "dpo" adds the reference model: `dpo_reference="forward"`
    (a reference forward every step) or "cached" (precomputed log-probs: no extra FLOPs).
    For DPO "token" means a policy token (chosen + rejected completions and prompts).
    """
    n = matmul_params(cfg)
    a_f = attention_fwd_flops(cfg, effective_seq_len(seq_len, doc_lens), causal=causal)
    if mode == "lora":
        p_r = lora_params(cfg, lora_rank, lora_targets)
        # fwd: 2N (base) + A_f + 2P_r (x@A, (xA)@B); bwd: 2N (activation grads through the
        # frozen weights, no weight grads) + 2A_f + 4P_r (adapter dX and dW).
        total, formula = 4.0 * n + 3.0 * a_f + 6.0 * p_r, "4N + 3A_f + 6P_r"
    elif mode in ("full", "freeze"):
        p_r = 0
        # fwd 2N + A_f; bwd 4N (dX and dW) + 2A_f.
        total, formula = 6.0 * n + 3.0 * a_f, "6N + 3A_f"
    else:
        raise UserError(f"FLOP count: unknown mode {mode!r}; expected lora, full or freeze")
    if stage == "dpo":
        if dpo_reference == "forward":
            # Reference = base model (LoRA: adapters off) forward on the same tokens.
            total += 2.0 * n + a_f
            formula += " + (2N + A_f reference)"
        elif dpo_reference != "cached":
            raise UserError(f"dpo_reference must be forward or cached, got {dpo_reference!r}")
    elif stage not in ("sft", "pt"):
        raise UserError(f"FLOP count: unknown stage {stage!r}; expected sft, pt or dpo")
    return FlopCount(total, n, a_f, p_r, formula)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s for a `jax.Device.device_kind`, or None when unknown."""
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            return PEAK_FLOPS[key]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak
