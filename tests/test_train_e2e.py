"""End-to-end LoRA SFT through `jaxlora train`: outputs, learning, TensorBoard, export, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxlora
from jaxlora.cli import main
from jaxlora.config import config_from_dict
from jaxlora.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer model whose head can express confident predictions (see tiny.embed_std)."""
    from jaxlora.io.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("e2e-model"), embed_std=0.1)


def _cfg(model_dir, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        cutoff_len=128,
        max_samples=96,
        val_size=16,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lora_rank=8,
        lora_alpha=16,
        logging_steps=2,
        eval_steps=4,
        save_steps=4,
        max_steps=12,
        warmup_steps=2,
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_train_outputs_learning_and_export(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = train(_cfg(tiny_model_dir, out), progress=False, log=lambda s: None)
    assert res.final_step == 12
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    trains = [r for r in records if "train/loss" in r]
    assert len(evals) == 3 and len(trains) == 6
    assert evals[-1] < evals[0] - 0.3, evals  # it learns
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(trains[0])
    tb = _tb_scalars(out)
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "eval/loss",
        "eval/perplexity",
    ):
        assert tag in tb, tag
    np.testing.assert_allclose(tb["eval/loss"], evals, rtol=1e-6)
    for f in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/chat_template.jinja",
        "loss.png",
        "report.md",
        "config.yaml",
    ):
        assert (out / f).is_file(), f
    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    ad = jaxlora.load_adapter(out / "adapter")
    ids = np.arange(1, 17)[None]
    assert np.abs(np.asarray(model.logits(ids, ad)) - np.asarray(model.logits(ids))).max() > 1e-3

    # CLI export: merged model loads with our loader and equals base+adapter.
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged = jaxlora.load_model(tmp_path / "merged", dtype="float32")
    np.testing.assert_allclose(merged.logits(ids), model.logits(ids, ad), atol=1e-4)
    assert merged.tokenizer is not None and merged.tokenizer.chat_template


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(_cfg(tiny_model_dir, full, lora_dropout=0.1), progress=False, log=lambda s: None)

    # Interrupted run: the preemption guard fires after optimiser step 6 (checkpoint written).
    from jaxlora.train import preemption

    calls = {"n": 0}

    def stop_after_6(self):
        calls["n"] += 1
        return calls["n"] == 6

    monkeypatch.setattr(preemption.PreemptionGuard, "should_stop", stop_after_6)
    part = tmp_path / "part"
    res = train(_cfg(tiny_model_dir, part, lora_dropout=0.1), progress=False, log=lambda s: None)
    assert res.preempted and res.final_step == 6
    assert not (part / "adapter").exists()
    monkeypatch.undo()
    res = train(_cfg(tiny_model_dir, part, lora_dropout=0.1), progress=False, log=lambda s: None)
    assert res.final_step == 12 and not res.preempted

    def strip(path):
        recs = [json.loads(x) for x in path.read_text().splitlines()]
        recs = [r for r in recs if "time/wall_s" not in r]  # the time breakdown: not replayable
        return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in recs]

    assert strip(part / "metrics.jsonl") == strip(full / "metrics.jsonl")
    from safetensors.numpy import load_file

    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_cli_bad_config_key_is_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_rnak: 8\ndataset: demo:identity_sft\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "lora_rnak" in err and "did you mean `lora_rank`" in err and "Traceback" not in err


def test_preflight_refuses_config_that_cannot_fit(tiny_model_dir, tmp_path):
    from jaxlora.errors import UserError

    cfg = _cfg(
        tiny_model_dir,
        tmp_path / "huge",
        per_device_train_batch_size=8192,
        cutoff_len=2048,
        packing=True,  # rows of cutoff_len: the pre-flight checks the longest shape the data makes
        val_size=0,
        eval_steps=None,
        max_samples=None,
    )
    with pytest.raises(UserError, match="will not fit in device memory.*gradient_accumulation"):
        train(cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "huge" / "checkpoints" / "1").exists()
