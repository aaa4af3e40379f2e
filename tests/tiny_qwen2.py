"""The tiny random Qwen2 checkpoint the PEFT/TRL reference tests share.

Grouped-query attention (4 heads, 2 KV heads) and q/k/v biases, fp32, 2 layers: small enough
that transformers/PEFT/TRL run it in milliseconds, shaped enough to catch head and bias
mix-ups. Needs torch + transformers; callers importorskip them first.
"""

from __future__ import annotations

from pathlib import Path

CFG = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def tiny_qwen2(seed: int = 0, bias_std: float = 0.0, **overrides):
    """A random transformers Qwen2 model in eval mode (torch seeded with `seed`).

    `bias_std` > 0 redraws the q/k/v biases (transformers initialises them to zero, which
    would hide a bias that an export drops)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**{**CFG, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if bias_std:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, bias_std)
    return model


def save_tiny_qwen2(directory: Path, **kwargs) -> Path:
    """`tiny_qwen2(**kwargs)` saved as a safetensors HF checkpoint in `directory`."""
    tiny_qwen2(**kwargs).save_pretrained(directory)
    return directory
