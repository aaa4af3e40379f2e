"""Run diagnosis on synthetic curves of every state; metrics.jsonl reading; loss PNG; report.md."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.evaluate import report
from jaxlora.evaluate.report import diagnose, fmt, plot_loss, read_metrics, write_report

STEPS = np.arange(10, 1010, 10)  # 100 logged train points, every 10 steps
CFG = {
    "learning_rate": 2e-4,
    "num_train_epochs": 3,
    "lora_rank": 16,
    "lora_dropout": 0.05,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "max_grad_norm": 1.0,
}


def _noise(seed: int, scale: float = 0.01) -> np.ndarray:
    return 1.0 + scale * np.random.default_rng(seed).standard_normal(len(STEPS))


def _records(train, eval_fn=None, eval_every: int = 50) -> list[dict]:
    recs = [
        {"step": int(s), "train/loss": float(v), "train/lr": 2e-4, "train/grad_norm": 0.7}
        for s, v in zip(STEPS, train, strict=True)
    ]
    if eval_fn is not None:
        for s in range(eval_every, int(STEPS[-1]) + 1, eval_every):
            loss = float(eval_fn(s))
            recs.append({"step": s, "eval/loss": loss, "eval/perplexity": math.exp(loss)})
    return recs


def _decay(tau: float, floor: float, amp: float = 1.5) -> np.ndarray:
    return amp * np.exp(-STEPS / tau) + floor


def test_failed_flat():
    d = diagnose(_records(2.0 * _noise(0)), CFG)
    assert d.state == "failed"
    assert any("learning_rate 2e-4 → 5e-5" in a for a in d.advice)
    assert d.evidence["train_total_drop"] < report.FAILED_MIN_DROP


def test_failed_rising():
    d = diagnose(_records((1.5 + 0.001 * STEPS) * _noise(1)), CFG)
    assert d.state == "failed"
    assert d.evidence["train_tail_change"] > report.FLAT_TOL
    assert "learning_rate 2e-4 → 5e-5 (the training loss rose)" in " ".join(d.advice)


def test_failed_flat_with_tiny_lr_suggests_raising():
    d = diagnose(_records(2.0 * _noise(2)), {**CFG, "learning_rate": 1e-6})
    assert d.state == "failed"
    assert "raise learning_rate 1e-6 → 1e-5" in " ".join(d.advice)


def test_diverged_nan():
    train = np.where(STEPS == 500, np.nan, _decay(300, 0.5))
    d = diagnose(_records(train), {**CFG, "max_grad_norm": 0})
    assert d.state == "diverged"
    assert d.evidence["nan_steps"] == [500]
    text = " ".join(d.advice)
    assert "lower learning_rate 2e-4 → 2e-5" in text and "check data for NaN/inf" in text
    assert "max_grad_norm 0 → 1.0" in text


def test_diverged_nan_grad_norm_and_short_run():
    recs = _records(_decay(300, 0.5))[:3]
    recs[1]["train/grad_norm"] = float("inf")
    d = diagnose(recs, CFG)
    assert d.state == "diverged" and d.evidence["nan_steps"] == [20]


def test_diverged_exploding():
    train = np.where(STEPS < 600, _decay(300, 0.5), 0.5 + (STEPS - 600) * 0.05)
    d = diagnose(_records(train), CFG)
    assert d.state == "diverged"
    assert d.evidence["max_train_loss"] > report.EXPLODE_RATIO * d.evidence["initial_train_loss"]
    assert "learning_rate 2e-4 → 5e-5" in " ".join(d.advice)


def test_single_spike_is_not_divergence():
    train = _decay(150, 0.8) * _noise(3)
    for i in (40, 60, 80):
        train[i] *= 2.5  # three isolated spikes that recover
    d = diagnose(_records(train), {**CFG, "max_grad_norm": 0})
    assert d.state == "converged"
    assert d.evidence["loss_spikes"] == [410, 610, 810]
    assert any("3 loss spikes (first at step 410): set max_grad_norm: 1.0" in a for a in d.advice)


def test_underfitting_both_falling():
    d = diagnose(
        _records(_decay(2000, 0.3, 2.0) * _noise(4), lambda s: 2.1 * math.exp(-s / 2000) + 0.35),
        CFG,
    )
    assert d.state == "underfitting"
    assert d.evidence["eval_tail_change"] < -report.FLAT_TOL
    assert d.evidence["train_tail_change"] < -report.FLAT_TOL
    text = " ".join(d.advice)
    assert "num_train_epochs 3 → 6" in text
    assert "raise learning_rate 2e-4 → 4e-4" in text
    assert "raise lora_rank 16 → 32" in text


def test_underfitting_train_only_and_max_steps():
    d = diagnose(_records(_decay(2000, 0.3, 2.0) * _noise(5)), {**CFG, "max_steps": 1000})
    assert d.state == "underfitting" and d.evidence["n_eval_points"] == 0
    assert "max_steps 1000 → 2000" in " ".join(d.advice)


def test_overfitting_eval_u_shape_turn_step():
    train = (_decay(200, 0.2, 2.0) + 0.05 * (1 - STEPS / 1000)) * _noise(6)
    d = diagnose(_records(train, lambda s: 1.0 + 0.5 * ((s - 400) / 400) ** 2), CFG)
    assert d.state == "overfitting"
    assert d.evidence["eval_turn_step"] == 400 == d.evidence["best_eval_step"]
    assert d.evidence["eval_rise_since_best"] == pytest.approx(1.125)
    assert d.evidence["train_eval_gap"] > 1.0
    text = " ".join(d.advice)
    assert "stop at step 400" in text
    assert "early_stopping_patience: 3 and load_best_model_at_end: true" in text
    assert "num_train_epochs 3 → 1.2" in text  # 3 × 400/1000, rounded up to 0.1
    assert "lora_dropout 0.05 → 0.1" in text and "weight_decay 0 → 0.01" in text
    assert "lower lora_rank 16 → 8" in text
    assert "step 400" in d.summary


def test_overfitting_train_only_memorisation_and_many_epochs():
    d = diagnose(_records(_decay(100, 0.01, 2.0)), {**CFG, "num_train_epochs": 20})
    assert d.state == "overfitting" and "memorisation" in d.summary
    text = " ".join(d.advice)
    assert "val_size" in text and "num_train_epochs 20 → 10" in text


def test_converged_both_flat():
    eval_fn = lambda s: (1.6 * math.exp(-s / 80) + 0.9) * (1 + 0.004 * math.sin(s))  # noqa: E731
    d = diagnose(_records(_decay(80, 0.8) * _noise(7), eval_fn), CFG)
    assert d.state == "converged"
    assert abs(d.evidence["train_tail_change"]) <= report.FLAT_TOL
    assert abs(d.evidence["eval_tail_change"]) <= report.FLAT_TOL
    assert d.evidence["plateau_step"] < 500
    assert any(a.startswith("no change needed") for a in d.advice)
    assert any("num_train_epochs 3 →" in a and "plateaued" in a for a in d.advice)


def test_memorisation_note_when_converged_with_eval():
    d = diagnose(_records(_decay(60, 0.01, 2.0), lambda s: 0.5), CFG)
    assert d.state == "converged"
    assert any("memorisation" in a for a in d.advice)


def test_too_short_only_when_nothing_can_be_said():
    d = diagnose(_records(_decay(300, 0.5))[:1], CFG)
    assert d.state == "too_short"
    assert "logging_steps 10 → 1" in " ".join(d.advice)
    assert diagnose([], {}).state == "too_short"


def _short_run(train, evals):
    """A 30-step run: train loss logged every 4 steps (7 points), eval every 8 (4 points)."""
    recs = [{"step": s, "train/loss": v} for s, v in zip(range(4, 29, 4), train, strict=True)]
    recs += [{"step": s, "eval/loss": v} for s, v in zip((8, 16, 24, 30), evals, strict=True)]
    return recs


def test_short_run_is_judged_on_the_whole_curve_and_evals():
    cfg = {**CFG, "logging_steps": 4, "num_train_epochs": 3}
    # Identity SFT: loss falls fast, eval still falling at the end -> underfitting, not too short.
    d = diagnose(_short_run([3.4, 2.3, 1.0, 0.6, 0.45, 0.4, 0.38], [1.7, 0.8, 0.5, 0.4]), cfg)
    assert d.state == "underfitting" and d.evidence["short_run"]
    assert "short run" in d.summary and "7 train point(s) and 4 eval(s)" in d.summary
    assert any(a.startswith("logging_steps 4 → 3") for a in d.advice)
    # Eval flat at the end -> converged; eval turned up -> overfitting at the turn.
    d = diagnose(_short_run([3.4, 2.3, 1.0, 0.6, 0.45, 0.4, 0.38], [1.7, 0.6, 0.5, 0.5]), cfg)
    assert d.state == "converged"
    d = diagnose(_short_run([3.4, 2.3, 1.0, 0.6, 0.3, 0.2, 0.1], [1.7, 0.6, 0.7, 0.9]), cfg)
    assert d.state == "overfitting" and d.evidence["eval_turn_step"] == 16
    # A flat short curve is a failure, judged overall.
    d = diagnose(_short_run([2.0, 2.01, 1.99, 2.0, 2.02, 1.98, 2.0], [2.0, 2.0, 2.0, 2.0]), cfg)
    assert d.state == "failed"
    # Evals alone (one train point) still give a direction.
    recs = [{"step": 28, "train/loss": 0.4}, {"step": 8, "eval/loss": 1.7}]
    recs.append({"step": 30, "eval/loss": 0.9})
    assert diagnose(recs, cfg).state == "underfitting"


def test_config_values_as_strings_and_missing():
    d = diagnose(_records(2.0 * _noise(0)), {"learning_rate": "2e-4"})
    assert "learning_rate 2e-4 → 5e-5" in " ".join(d.advice)
    recs = [{k: v for k, v in r.items() if k != "train/lr"} for r in _records(2.0 * _noise(0))]
    d = diagnose(recs, {})
    assert d.state == "failed" and d.advice[0].startswith("lower learning_rate (")
    # Without a learning_rate in the config, the peak logged lr is the starting point.
    assert "learning_rate 2e-4 → 5e-5" in diagnose(_records(2.0 * _noise(0)), {}).advice[0]


def test_resumed_run_relogged_steps_keep_the_later_value():
    first = _records(2.0 * _noise(0))[:60]  # a failed first attempt up to step 600 ...
    second = _records(_decay(150, 0.8) * _noise(3))[40:]  # ... resumed from step 410
    d = diagnose(first + second, CFG)
    assert d.state == "converged" and d.evidence["n_train_points"] == 100


def test_fmt():
    assert [fmt(x) for x in (2e-4, 7.5e-5, 3.0, 1.5, 0.1, 0)] == [
        "2e-4",
        "7.5e-5",
        "3",
        "1.5",
        "0.1",
        "0",
    ]


def test_ema_is_debiased_and_smooths():
    assert report.ema(np.full(50, 3.0)) == pytest.approx(np.full(50, 3.0))
    x = 2.0 + 0.1 * np.random.default_rng(0).standard_normal(400)
    assert report.ema(x)[100:].std() < 0.5 * x[100:].std()


def test_read_metrics_truncated_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    good = [{"step": 10, "train/loss": 2.0}, {"step": 20, "eval/loss": float("nan")}]
    p.write_text("\n".join(json.dumps(r) for r in good) + '\n\n{"step": 30, "train/lo')
    recs = read_metrics(p)
    assert len(recs) == 2 and recs[0] == good[0] and math.isnan(recs[1]["eval/loss"])


def test_read_metrics_errors(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{broken\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2"):
        read_metrics(p)
    p.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2: expected a JSON object"):
        read_metrics(p)
    with pytest.raises(UserError, match="cannot read"):
        read_metrics(tmp_path / "missing.jsonl")


def test_plot_loss_writes_png_with_all_curves(tmp_path):
    train = np.where(STEPS == 300, np.nan, _decay(200, 0.5))
    recs = _records(train, lambda s: 1.0 + 0.5 * ((s - 400) / 400) ** 2)
    out = tmp_path / "loss.png"
    fig = plot_loss(recs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax, ax2 = fig.axes
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert labels[:3] == ["train loss (raw)", "train loss (EMA)", "eval loss"]
    assert "best eval (step 400)" in labels and "non-finite loss (step 300)" in labels
    assert [ln.get_label() for ln in ax2.get_lines()] == ["learning rate"]
    assert ax.get_legend() is not None and ax.get_title()
    assert list(tmp_path.iterdir()) == [out]  # no temp file left behind


def test_plot_loss_empty_records(tmp_path):
    fig = plot_loss([], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG" and len(fig.axes) == 1


def test_write_report_dpo_run(tmp_path):
    recs = _records((_decay(200, 0.2, 0.5) + 0.05 * (1 - STEPS / 1000)) * _noise(8))
    for i, r in enumerate(recs):
        r["train/rewards/accuracies"] = min(1.0, 0.5 + i / 150)
    recs += [
        {"step": s, "eval/loss": 0.4 + 0.3 * ((s - 300) / 300) ** 2} for s in range(100, 1001, 100)
    ]
    path = write_report(tmp_path / "run", recs, {**CFG, "stage": "dpo"})
    text = path.read_text()
    assert path.name == "report.md" and (tmp_path / "run" / "loss.png").exists()
    assert text.startswith("# Run report: OVERFITTING")
    assert "![loss curve](loss.png)" in text and "stop at step 300" in text
    assert "| eval_turn_step | 300 |" in text
    assert "| train/rewards/accuracies | 1 | 1 |" in text
    assert "| eval/loss | 2.033 | 0.4 | 300 |" in text
    assert "- stage: dpo" in text
