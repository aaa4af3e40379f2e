"""Where metrics go: `metrics.jsonl` (one JSON object per logging event) and TensorBoard.

Both use the same tag names (`train/loss`, `eval/perplexity`, ...). On resume, records logged
after the checkpoint being resumed from are dropped first, so the file reads exactly like an
uninterrupted run (except the last record, `time/*` and `compile/*`: where this process's wall
time went, see `jaxlora.train.timing`; an interrupted process's breakdown is dropped too).
TensorBoard is written with tensorboardX (no TensorFlow needed); a resumed run starts a new event
file and TensorBoard shows the latest value per step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from jaxlora.io.atomic import atomic_write_text
from jaxlora.io.no_torch import without_torch

TIMING_KEY = "time/wall_s"  # marks the end-of-run time breakdown record (train.timing)
PREF = "pref/"  # stage metric sums: `pref/<name>` plus the row counts `pref/count[/<group>]`


def preference_means(sums: dict[str, float]) -> dict[str, float]:
    """Stage metric SUMS (over rows, one or many batches) -> means, keyed without `pref/`.

    `pref/<...>/<leaf>` is divided by `pref/count/<leaf>` when the stage reports that count (KTO:
    `rewards/chosen` over the desirable rows only), else by `pref/count` (all rows / pairs). A
    mean whose count is 0 in this window is left out. Without a `rewards/margins` sum of its own
    (KTO's chosen and rejected rows are different rows), margins = chosen mean - rejected mean,
    as TRL's KTOTrainer logs it.
    """
    out: dict[str, float] = {}
    for key, value in sums.items():
        if not key.startswith(PREF) or key.startswith(PREF + "count"):
            continue
        name = key[len(PREF) :]
        leaf = name.rsplit("/", 1)[-1]
        count = sums.get(f"{PREF}count/{leaf}", sums.get(f"{PREF}count", 0.0))
        if count > 0:
            out[name] = value / count
    if "rewards/margins" not in out and PREF + "rewards/margins" not in sums:
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": JSON has no literal for them
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records of a metrics.jsonl (a torn last line from a kill is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


class MetricsLog:
    """Append-only metrics.jsonl + TensorBoard writer (only on the logging process)."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, enabled=True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            # The interrupted process's time breakdown goes too: each process writes its own.
            kept = [
                r
                for r in read_metrics(self.path)
                if r.get("step", 0) <= resume_step and TIMING_KEY not in r
            ]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        with without_torch():  # tensorboardX would import torch only to accept its tensors
            from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tb"), flush_secs=10)
        self._file = self.path.open("a")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(float(v)) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(k, float(v), int(step))

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self.tb.flush()
            self.tb.close()
