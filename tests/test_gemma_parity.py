"""Gemma 2 / Gemma 3 (text, and the text part of a Gemma 3 multimodal checkpoint) against
transformers on tiny random models: fp32 logits over a sequence longer than the sliding window,
padded and packed rows; weights scaled up so the soft-caps and the (1 + w) norms matter."""

from __future__ import annotations

import numpy as np
import pytest

import jaxlora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

VOCAB = 101
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    sliding_window=5,  # shorter than the 14-token rows below
    query_pre_attn_scalar=24,  # != head_dim
    attn_implementation="eager",
)
GEMMA2 = dict(
    num_hidden_layers=3,  # sliding, full, sliding
    attn_logit_softcapping=2.0,  # small caps: the random scores/logits reach them
    final_logit_softcapping=3.0,
)
GEMMA3 = dict(
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    },
)


def gemma_config(family: str):
    if family == "gemma2":
        return transformers.Gemma2Config(**TEXT, **GEMMA2)
    text = transformers.Gemma3TextConfig(**TEXT, **GEMMA3)
    if family == "gemma3_text":
        return text
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return transformers.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
        attn_implementation="eager",
    )


def save_gemma(path, family: str, seed: int = 0, embed_std: float = 0.5):
    """A tiny random Gemma saved as safetensors; returns the fp32 torch model (eval mode)."""
    cfg = gemma_config(family)
    torch.manual_seed(seed)
    if family == "gemma3":
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.float().eval()
    with torch.no_grad():  # larger weights than the init: logits and scores reach the caps
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))  # applied as (1 + w)
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


ROWS = np.random.default_rng(0).integers(3, VOCAB - 3, size=(2, 14))  # no image-token ids


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gemma3"])
def test_logits_match_transformers(tmp_path, family):
    tm = save_gemma(tmp_path, family)
    model = jaxlora.load_model(tmp_path, dtype="float32")
    assert model.config.model_type == family
    mask = np.ones_like(ROWS)
    mask[1, 10:] = 0  # right padding
    ref = torch_logits(tm, ROWS, mask)
    got = np.asarray(model.logits(ROWS, segment_ids=mask))
    err = np.abs(got - ref)[mask.astype(bool)].max()
    assert err <= 1e-4, f"{family}: max |Δlogits| = {err}"
    assert np.abs(ref).max() > 1.0  # the check is not vacuous: logits are O(1), not ~0
    if family == "gemma2":  # the final soft-cap bounds the logits
        assert np.abs(got).max() <= 3.0 and np.abs(got).max() > 2.0

    # Packed: two samples in one row (positions restart, segment ids 1 / 2) equal each sample
    # run alone through transformers.
    a, b = ROWS[0, :9], ROWS[1, :5]
    packed = np.concatenate([a, b])[None]
    pos = np.concatenate([np.arange(9), np.arange(5)])[None]
    seg = np.concatenate([np.full(9, 1), np.full(5, 2)])[None]
    got = np.asarray(model.logits(packed, positions=pos, segment_ids=seg))[0]
    ref = np.concatenate([torch_logits(tm, a[None])[0], torch_logits(tm, b[None])[0]])
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"{family} packed: max |Δlogits| = {err}"


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    """KV-cache decoding (per-layer cache masks, soft-capped head) past the sliding window:
    greedy tokens equal transformers' `generate` on each prompt alone. Small embeddings: with
    large tied ones every position would just repeat its own token, whatever the attention."""
    from jaxlora.evaluate.generate import generate

    tm = save_gemma(tmp_path, family, seed=1, embed_std=0.05)
    model = jaxlora.load_model(tmp_path, dtype="float32")
    prompts = [ROWS[0].tolist(), ROWS[1, :6].tolist()]  # left padding in one batch
    ours = generate(model, prompts, max_new_tokens=8, stop_token_ids=())
    for p, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = tm.generate(
                torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None
            )
        assert got == out[0, len(p) :].tolist()
