"""The run directory: claim it (resume, restart or refuse) and write its header files.

Why this file exists: a run directory is where a user's hours of training end up, so deciding
whether to resume, restart or refuse is its own small policy, kept apart from the builders.
It runs after everything that can fail on bad input has been built (config, data, model, steps),
so a typo never leaves an empty or clobbered directory behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxlora.config import Config, dump_config
from jaxlora.errors import UserError
from jaxlora.parallel import distributed

# What a run writes before its first checkpoint completes (it may restart over these only).
_BEFORE_FIRST_CHECKPOINT = {"config.yaml", "data_report.json", "metrics.jsonl", "tb", "checkpoints"}


def claim_run_dir(cfg: Config, log: Callable[[str], None]) -> tuple[Path, bool]:
    """Create/validate the run directory; returns (path, resuming).

    A directory with a complete checkpoint is resumed. One that holds only the files of a
    jaxlora run that died before its first checkpoint is restarted. Anything else non-empty
    is refused unless `overwrite_output_dir`, so a typo never clobbers someone's files.
    """
    run_dir = Path(cfg.train.output_dir)
    ckpts = run_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
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


def write_header(run_dir: Path, cfg: Config, data_report: Any) -> None:
    """`config.yaml` (the resolved config) and `data_report.json`; process 0 only."""
    if not distributed.is_main_process():
        return
    dump_config(cfg, run_dir / "config.yaml")
    report = json.dumps(data_report.to_dict(), indent=2, default=str)
    (run_dir / "data_report.json").write_text(report)
