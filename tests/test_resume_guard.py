"""Resuming a run directory: a changed model/method shape is refused in one line (exit 2) from the
saved config.yaml; other changed keys resume, are logged and land in config_history.jsonl and
report.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxlora.config import config_from_dict
from jaxlora.errors import UserError
from jaxlora.train.loop import train
from jaxlora.train.run_dir import check_resume


def _base(model_dir, out) -> dict:
    return dict(
        model_name_or_path=str(model_dir),
        dataset="demo:identity_sft",
        cutoff_len=64,
        max_samples=16,
        per_device_train_batch_size=4,
        lora_rank=4,
        logging_steps=1,
        save_steps=2,
        max_steps=2,
        bf16=False,
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A 2-step LoRA run with a checkpoint at step 2 (copied per test before it is changed)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train(config_from_dict(_base(tiny_model_dir, out)), progress=False, log=lambda s: None)
    assert (out / "checkpoints" / "2").is_dir()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


@pytest.mark.slow
def test_changed_lora_rank_is_one_line_exit_2(tiny_model_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    cfg = tmp_path / "c.yaml"
    # LLaMA-Factory keys jaxlora ignores would each print a note; the refusal comes first.
    cfg.write_text(
        yaml.safe_dump({**_base(tiny_model_dir, run), "do_train": True, "report_to": "none"})
    )
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlora.cli", "train", str(cfg), "lora_rank=8", "use_dora=true"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) <= 3, lines
    err = proc.stderr
    assert "lora_rank 4 → 8" in err and "use_dora False → True" in err, err
    assert "output_dir=" in err and "overwrite_output_dir: true" in err, err
    assert "Traceback" not in err and "Event loop" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing touched


def test_shape_keys_follow_the_method(tiny_model_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    base = _base(tiny_model_dir, run)
    with pytest.raises(UserError, match=r"finetuning_type lora → full"):
        check_resume(config_from_dict({**base, "finetuning_type": "full"}))
    with pytest.raises(UserError, match=r"model_name_or_path .* → tiny"):
        check_resume(config_from_dict({**base, "model_name_or_path": "tiny"}))
    # Not shape keys: allowed. overwrite_output_dir replaces the run, so nothing to guard.
    check_resume(config_from_dict({**base, "learning_rate": 1e-3, "lora_alpha": 3}))
    check_resume(config_from_dict({**base, "lora_rank": 8, "overwrite_output_dir": True}))
    check_resume(config_from_dict({**base, "lora_rank": 8, "output_dir": str(tmp_path / "new")}))


def test_other_changes_resume_and_are_kept_in_history(tiny_model_dir, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    logs: list[str] = []
    changed = {**_base(tiny_model_dir, run), "learning_rate": 5e-4, "max_steps": 4}
    res = train(config_from_dict(changed), progress=False, log=logs.append)
    assert res.final_step == 4
    assert any("resuming from checkpoint at step 2" in s for s in logs), logs
    assert any("`learning_rate` changed 0.0001 → 0.0005" in s for s in logs), logs
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["resumed_at_step"] == 2
    assert history[0]["changed"] == {"learning_rate": [1e-4, 5e-4], "max_steps": [2, 4]}
    assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == 5e-4
    report = (run / "report.md").read_text()
    assert "## Config history" in report
    assert "- step 2: `learning_rate` 0.0001 → 0.0005, `max_steps` 2 → 4" in report, report
