"""The run directory: claim it (resume, restart or refuse) and write its header files.

Why this file exists: a run directory is where a user's hours of training end up, so deciding
whether to resume, restart or refuse is its own small policy, kept apart from the builders.
`check_resume` runs first (before any model is loaded or orbax is touched): a resumed run whose
saved `config.yaml` differs in a key that shapes the checkpointed state (model, method, adapter
shape) is refused in one line. `claim_run_dir` runs after everything that can fail on bad input
has been built (config, data, model, steps), so a typo never leaves an empty or clobbered
directory behind. `write_header` keeps the other changed keys of a resume in
`config_history.jsonl`, so the report can say which settings the earlier steps ran with.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxlora.config import Config, config_to_dict, dump_config
from jaxlora.errors import UserError
from jaxlora.parallel import distributed

# What a run writes before its first checkpoint completes (it may restart over these only).
_BEFORE_FIRST_CHECKPOINT = {"config.yaml", "data_report.json", "metrics.jsonl", "tb", "checkpoints"}
HISTORY = "config_history.jsonl"  # one line per resume: step, time, {key: [old, new]}

# Keys that fix the shapes and meaning of the checkpointed state (trainable tree, optimiser
# state, the frozen base it was trained against): a resume that changes one would either fail
# deep inside orbax (shape mismatch) or silently continue a different model. Per method, only
# the keys that method reads (`lora_rank` does not matter to a full fine-tune).
_SHAPE_KEYS = (
    "model_name_or_path",
    "stage",
    "finetuning_type",
    "quantization_bit",
    "quantization_type",
    "double_quantization",
)
_METHOD_SHAPE_KEYS = {
    "lora": ("lora_rank", "lora_target", "use_dora", "pissa_init"),
    "freeze": ("freeze_trainable_layers", "freeze_trainable_modules", "full_precision_master"),
    "full": ("full_precision_master",),
}
# Keys whose change on resume is not worth a history line (where the run is, how it is claimed).
_UNTRACKED = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint"}


def _has_checkpoint(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The flat dict of the run's saved config.yaml (None when absent or unreadable)."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return saved if isinstance(saved, dict) else None


def _flat(cfg: Config) -> dict[str, Any]:
    # Through YAML and back, so values compare the way they were saved (tuples, floats, None).
    return yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list]:
    return {k: [old[k], v] for k, v in new.items() if k in old and old[k] != v}


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def check_resume(cfg: Config) -> None:
    """Refuse, in one line, to resume a run directory whose checkpoint was made with another
    model / method / adapter shape. Reads only the saved config.yaml (no orbax, no model)."""
    run_dir = Path(cfg.train.output_dir)
    if cfg.train.overwrite_output_dir or not _has_checkpoint(run_dir):
        return
    old = _saved_config(run_dir)
    if old is None:
        return
    new = _flat(cfg)
    methods = {old.get("finetuning_type"), new["finetuning_type"]}
    keys = [
        *_SHAPE_KEYS,
        *(k for m in sorted(methods, key=str) for k in _METHOD_SHAPE_KEYS.get(m, ())),
    ]
    changed = _changes(old, {k: new[k] for k in dict.fromkeys(keys) if k in new})
    if changed:
        diff = ", ".join(f"{k} {_show(a)} → {_show(b)}" for k, (a, b) in changed.items())
        raise UserError(
            f"output_dir {run_dir} holds checkpoints of a different model/method ({diff}); "
            f"they cannot be resumed with this config: start a new run with output_dir=NEW_DIR, "
            f"or replace this one with overwrite_output_dir: true"
        )


def claim_run_dir(cfg: Config, log: Callable[[str], None]) -> tuple[Path, bool]:
    """Create/validate the run directory; returns (path, resuming).

    A directory with a complete checkpoint is resumed. One that holds only the files of a
    jaxlora run that died before its first checkpoint is restarted. Anything else non-empty
    is refused unless `overwrite_output_dir`, so a typo never clobbers someone's files.
    """
    run_dir = Path(cfg.train.output_dir)
    has_ckpt = _has_checkpoint(run_dir)
    main = distributed.is_main_process()
    if cfg.train.overwrite_output_dir and run_dir.exists() and main:
        shutil.rmtree(run_dir)
        has_ckpt = False
    elif run_dir.exists() and any(run_dir.iterdir()) and not has_ckpt:
        extra = sorted(p.name for p in run_dir.iterdir() if p.name not in _BEFORE_FIRST_CHECKPOINT)
        if not (run_dir / "config.yaml").is_file() or extra:
            raise UserError(
                f"output_dir {run_dir} exists and holds no checkpoint to resume from"
                + (f" but has {', '.join(extra[:3])}" if extra else "")
                + "; choose another output_dir or set overwrite_output_dir: true"
            )
        log(f"{run_dir}: previous run has no checkpoint yet; starting from step 0")
        if main:
            shutil.rmtree(run_dir)
    distributed.sync("claim_run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output_dir {run_dir} is not writable: {e.strerror}") from None
    return run_dir, has_ckpt


def write_header(
    run_dir: Path,
    cfg: Config,
    data_report: Any,
    resuming: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """`config.yaml` (the resolved config) and `data_report.json`; process 0 only.

    On resume, the keys that differ from the saved config.yaml are logged and appended to
    `config_history.jsonl` (with the step the run resumes at) before config.yaml is replaced.
    """
    if not distributed.is_main_process():
        return
    old = _saved_config(run_dir) if resuming else None
    if old is not None:
        changed = {k: v for k, v in _changes(old, _flat(cfg)).items() if k not in _UNTRACKED}
        steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
        entry = {"resumed_at_step": max(steps), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        entry["changed"] = changed
        for key, (a, b) in changed.items():
            log(f"resume: `{key}` changed {_show(a)} → {_show(b)} (kept in {HISTORY})")
        with open(run_dir / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")
    dump_config(cfg, run_dir / "config.yaml")
    report = json.dumps(data_report.to_dict(), indent=2, default=str)
    (run_dir / "data_report.json").write_text(report)
