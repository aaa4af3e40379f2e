"""`jaxlora train` end to end on a tiny random Gemma 2 (soft-caps, sliding window shorter than
the rows, so the per-layer `lax.cond` and the capped fused loss are differentiated): it learns,
the adapter carries the tokenizer's chat template, and `jaxlora export --merged` gives a
checkpoint transformers loads with the adapted logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import jaxlora

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch


@pytest.mark.slow
def test_gemma2_lora_sft_run_and_merged_export(tmp_path):
    from jaxlora.cli import main
    from jaxlora.config import config_from_dict
    from jaxlora.io.tiny import make_tiny_model
    from jaxlora.train.loop import train

    tok = make_tiny_model(tmp_path / "tok", hidden_size=32, num_hidden_layers=2)
    vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
    cfg = transformers.Gemma2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        query_pre_attn_scalar=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=4.0,
    )
    torch.manual_seed(0)
    base = tmp_path / "gemma2"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    for f in tok.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, base / f.name)

    out = tmp_path / "run"
    run_cfg = config_from_dict(
        dict(
            model_name_or_path=str(base),
            dataset="demo:identity_sft",
            cutoff_len=64,
            max_samples=48,
            val_size=8,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            lora_rank=4,
            lora_target="all",
            logging_steps=2,
            eval_steps=3,
            save_steps=6,
            max_steps=6,
            bf16=False,
            output_dir=str(out),
        )
    )
    train(run_cfg, progress=False, log=lambda s: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0], evals  # it learns
    template = (out / "adapter" / "chat_template.jinja").read_text()
    assert template == jaxlora.load_model(base).tokenizer.chat_template

    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    model = jaxlora.load_model(base, dtype="float32")
    adapter = jaxlora.load_adapter(out / "adapter")
    ids = np.arange(1, 41)[None]  # longer than the window
    ours = np.asarray(model.logits(ids, adapter))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref = merged(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - ours).max() <= 1e-4
    assert np.abs(ours - np.asarray(model.logits(ids))).max() > 1e-3  # the adapter did something
