"""`stage: kto` end to end: config rules, the KTO stage in the real step (`build_run`), metric
means, the reference for LoRA / QLoRA / full, and CLI runs on the bundled and LLaMA-Factory demo.

Loss/KL/reward numerics against TRL are in tests/test_kto_loss_trl.py and test_kto_trl_model.py;
here the stage is checked as the trainer runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlora.cli.app import main
from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.train.setup import build_run
from jaxlora.train.tracking import preference_means

REPO = Path(__file__).resolve().parents[1]
# ../shared next to the checkout (or to the worktrees' folder, for a git worktree checkout)
LF_DIR = next(
    (p / "shared" / "data" / "llamafactory" for p in REPO.parents[:2] if (p / "shared").is_dir()),
    REPO.parent / "shared" / "data" / "llamafactory",
)


def _cfg(model_dir, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        stage="kto",
        dataset="demo:kto_demo",
        cutoff_len=64,
        max_samples=16,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        bf16=False,
        output_dir=str(out),
    )
    base.update(kw)
    return config_from_dict(base)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(per_device_train_batch_size=1), "per_device_train_batch_size` >= 2"),
        (dict(per_device_eval_batch_size=1), "per_device_eval_batch_size` >= 2"),
        (dict(packing=True), "cannot pack"),
        (dict(kto_chosen_weight=0), "kto_chosen_weight` must be > 0"),
        (dict(precompute_ref_logps=True), "precompute_ref_logps"),
    ],
)
def test_config_refuses(tmp_path, kw, match):
    with pytest.raises(UserError, match=match):
        _cfg("tiny", tmp_path, **kw)


def test_preference_means_per_group_counts():
    sums = {
        "pref/rewards/chosen": 3.0,
        "pref/rewards/rejected": -4.0,
        "pref/logps/chosen": -30.0,
        "pref/kl": 0.5 * 5,
        "pref/count/chosen": 3.0,
        "pref/count/rejected": 2.0,
        "pref/count": 5.0,
        "loss_sum": 9.0,
    }
    out = preference_means(sums)
    assert out == {
        "rewards/chosen": 1.0,
        "rewards/rejected": -2.0,
        "logps/chosen": -10.0,
        "kl": 0.5,
        "rewards/margins": 3.0,
    }
    # No undesirable row in the window: no rejected mean and no margin (not a 0/0).
    out = preference_means({**sums, "pref/count/rejected": 0.0})
    assert "rewards/rejected" not in out and "rewards/margins" not in out
    # DPO: one count for every metric; its own margins sum wins.
    dpo = {"pref/rewards/chosen": 2.0, "pref/rewards/margins": 6.0, "pref/count": 2.0}
    assert preference_means(dpo) == {"rewards/chosen": 1.0, "rewards/margins": 3.0}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_step0_is_reference_and_step_moves_rewards(tiny_model_dir, tmp_path, method):
    """Step 0: policy == reference, so rewards are 0, z0 = 0 and the loss is the weighted mean
    of 1 - sigmoid(0); the reference is the adapters-off base (LoRA / QLoRA) or a frozen copy
    (full) and stays put while the policy moves."""
    kw = {"qlora": dict(quantization_bit=4), "full": dict(finetuning_type="full")}.get(method, {})
    run = build_run(
        _cfg(tiny_model_dir, tmp_path / "r", kto_chosen_weight=2.0, **kw), log=lambda s: None
    )
    assert ("ref_trainable" in run.parts.frozen) == (method == "full")
    batch = run.batches.batch(0)
    labels = np.asarray(batch["kto_label"])
    state, out = run.steps.train_step(run.steps.state, run.parts.frozen, batch)
    out = {k: float(v) for k, v in jax.device_get(out).items()}
    w = np.where(labels > 0, 2.0, 1.0)
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], np.mean(w * 0.5), rtol=1e-5)
    assert out["tokens"] == 4 and out["pref/count/chosen"] == labels.sum()
    means = preference_means(out)
    assert abs(means["kl"]) < 1e-6 and abs(means["rewards/chosen"]) < 1e-4
    for _ in range(3):
        state, out = run.steps.train_step(state, run.parts.frozen, batch)
    means = preference_means({k: float(v) for k, v in jax.device_get(out).items()})
    # Desirable up, undesirable down relative to a reference that did not move with the policy.
    assert means["rewards/margins"] > 0.05, means


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_kto_raises_heldout_margin(tmp_path):
    """A LLaMA-Factory-style YAML with `stage: kto` on the bundled demo: the reward margin on
    held-out rows (eval) starts at 0 (policy == reference) and rises; TensorBoard has the KTO
    metrics."""
    out = tmp_path / "run"
    yaml = tmp_path / "kto.yaml"
    yaml.write_text(
        "model_name_or_path: tiny\nstage: kto\ndo_train: true\nfinetuning_type: lora\n"
        "lora_target: all\npref_beta: 0.1\nkto_chosen_weight: 1.0\nkto_rejected_weight: 1.0\n"
        "dataset: demo:kto_demo\ntemplate: chatml\ncutoff_len: 64\nval_size: 0.2\n"
        f"output_dir: {out}\nlogging_steps: 4\neval_steps: 4\nper_device_train_batch_size: 8\n"
        "learning_rate: 5.0e-4\nmax_steps: 12\nbf16: false\nreport_to: none\n"
    )
    assert main(["train", str(yaml), "--no-progress"]) == 0
    evals = [r for r in _records(out) if "eval/rewards/margins" in r]
    assert len(evals) == 3
    margins = [r["eval/rewards/margins"] for r in evals]
    assert margins[-1] > 0.3 and margins[-1] > margins[0], margins
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                "train/kl", "train/logps/chosen", "eval/rewards/margins"):  # fmt: skip
        assert tag in tags, tag
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_llamafactory_kto_demo_trains(tmp_path):
    """LLaMA-Factory's own kto_en_demo through its dataset_info.json (`kto_tag` column)."""
    if not (LF_DIR / "kto_en_demo.json").is_file():
        pytest.skip(f"{LF_DIR}/kto_en_demo.json not present")
    out = tmp_path / "run"
    yaml = tmp_path / "kto.yaml"
    yaml.write_text(
        f"model_name_or_path: tiny\nstage: kto\ndataset: kto_en_demo\ndataset_dir: {LF_DIR}\n"
        "cutoff_len: 128\nmax_samples: 16\nmax_steps: 2\nlogging_steps: 1\n"
        f"per_device_train_batch_size: 4\nbf16: false\noutput_dir: {out}\n"
    )
    assert main(["train", str(yaml), "--no-progress"]) == 0
    trains = [r for r in _records(out) if "train/loss" in r]
    assert len(trains) == 2 and all(np.isfinite(r["train/loss"]) for r in trains)
    assert {"train/kl", "train/rewards/chosen"} <= set(trains[0]) | set(trains[1])
