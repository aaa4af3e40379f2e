"""Evaluation during training on real tiny runs: early stopping keeps the best adapter, the run
report diagnoses a too-high learning rate and overfitting, sample generations reach TensorBoard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxlora.config import config_from_dict
from jaxlora.train.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from jaxlora.io.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("eval-model"), embed_std=0.1)


def _run(model_dir, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        cutoff_len=128,
        per_device_train_batch_size=8,
        lora_rank=16,
        lora_alpha=32,
        logging_steps=2,
        bf16=False,
        save_steps=1000,
        output_dir=str(out),
    )
    base.update(kw)
    return train(config_from_dict(base), progress=False, log=lambda s: None)


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _conflicting_data(d):
    """Same questions, answers that disagree in one word: memorising the training answer
    ("red") first helps the eval loss (shared words), then hurts it ("blue") — a clean U."""
    names = [
        "apple",
        "river",
        "stone",
        "cloud",
        "table",
        "green",
        "house",
        "light",
        "music",
        "paper",
        "water",
        "earth",
        "tiger",
        "bread",
        "chair",
        "glass",
    ]
    for split, color in (("train", "red"), ("eval", "blue")):
        rows = [
            {
                "instruction": f"What is the code for {n}?",
                "input": "",
                "output": f"The color is {color}",
            }
            for n in names
        ]
        (d / f"{split}.json").write_text(json.dumps(rows))
    return str(d / "train.json"), str(d / "eval.json")


def test_overfit_run_stops_early_exports_best_and_is_diagnosed(model_dir, tmp_path):
    out = tmp_path / "overfit"
    train_ds, eval_ds = _conflicting_data(tmp_path)
    res = _run(
        model_dir,
        out,
        dataset=train_ds,
        eval_dataset=eval_ds,
        cutoff_len=64,
        finetuning_type="full",
        learning_rate=2e-3,
        max_steps=100,
        eval_steps=4,
        early_stopping_patience=3,
        load_best_model_at_end=True,
        generation_eval_samples=2,
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    assert res.stopped_early and res.final_step < 100
    evals = [(r["step"], r["eval/loss"]) for r in _records(out) if "eval/loss" in r]
    best_step, best = min(evals, key=lambda x: x[1])
    # Stopped exactly `patience` evaluations after the minimum.
    assert res.final_step == best_step + 3 * 4
    assert res.best_eval_loss == pytest.approx(best)
    # The exported model is the best checkpoint, not the last state.
    import jaxlora
    from jaxlora.evaluate.scoring import teacher_forced_loss
    from jaxlora.train.batches import load_data

    exported = jaxlora.load_model(out / "model", dtype="float32")
    cfg = config_from_dict(_flat(out))
    data = load_data(cfg, exported.tokenizer)
    loss = teacher_forced_loss(exported, None, data.eval, pad_id=data.pad_id)
    assert loss == pytest.approx(best, rel=1e-4)
    report = (out / "report.md").read_text()
    assert "OVERFITTING" in report and f"step {best_step}" in report
    # Sample generations were logged as TensorBoard text.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert any("generations" in t for t in acc.Tags()["tensors"])


def _flat(out):
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def test_too_high_learning_rate_is_diagnosed(model_dir, tmp_path):
    out = tmp_path / "hot"
    _run(
        model_dir,
        out,
        max_samples=64,
        learning_rate=1.0,
        max_steps=24,
        warmup_steps=0,
        lr_scheduler_type="constant",
        finetuning_type="full",
        max_nonfinite_skips=100,
    )
    report = (out / "report.md").read_text()
    assert ("DIVERGED" in report) or ("FAILED" in report)
    # The advice names a lower learning rate than the one used.
    lrs = [
        float(x.split("→")[1].split()[0].strip("`,"))
        for x in report.splitlines()
        if "learning_rate" in x and "→" in x
    ]
    assert lrs and min(lrs) < 1.0
    assert np.isfinite(lrs).all()
