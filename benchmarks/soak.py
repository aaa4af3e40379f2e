"""Soak test: thousands of tiny training steps with frequent checkpoints and evals; is memory flat?

Why this script exists: a trainer that leaks a little per step (a growing metrics buffer, an
un-joined checkpoint thread, a retraced jit, device buffers kept alive by a Python list) dies
hours into a real run. This runs the real `jaxlora.train.loop.train` loop on a tiny model (hidden
32, 1 layer, cutoff_len 32, batch 2) for `--steps` optimiser steps with a checkpoint every 50 steps,
an evaluation (+ best-weights checkpoint when it improves) every 100 and logging every 10, and
samples the process's resident set size (VmRSS from /proc/self/status) every 100 steps.

Prints the RSS series and, as the last line, one JSON object:

    python3 benchmarks/soak.py                 # 2,000 steps, ~2-4 min on 2 CPU cores
    python3 benchmarks/soak.py --steps 500     # quicker look

`growth_after_warmup_mib` is RSS at the end minus RSS at the end of warm-up (first 200 steps:
compilation, first checkpoint/eval, allocator pools); `slope_mib_per_1k_steps` is a least-squares
fit over the post-warm-up samples, which is less sensitive to one noisy sample.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    """Current resident set size of this process in MiB (VmRSS; ru_maxrss is only the peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # peak, as a fallback


def soak_config(model_dir: Path, out: Path, steps: int) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "dataset": "demo:identity_sft",
        "cutoff_len": 32,
        "val_size": 8,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_dropout": 0.05,
        "logging_steps": 10,
        "save_steps": 50,
        "eval_steps": 100,
        "load_best_model_at_end": True,
        "max_steps": steps,
        "warmup_steps": 20,
        "bf16": False,
        "seed": 0,
        "output_dir": str(out),
    }


def run(steps: int, every: int, warmup: int, workdir: Path, trace: bool = False) -> dict:
    import jaxlora.train.loop as train_mod
    from jaxlora.config import config_from_dict
    from jaxlora.io.tiny import MICRO_MODEL, make_tiny_model

    model_dir = make_tiny_model(
        workdir / "model",
        **MICRO_MODEL,
        embed_std=0.1,
    )
    cfg = config_from_dict(soak_config(model_dir, workdir / "run", steps))
    series: list[tuple[int, float]] = []
    snaps: list = []
    t0 = time.perf_counter()

    def sample(step: int) -> None:
        series.append((step, rss_mib()))
        print(
            f"step {step:5d}  rss {series[-1][1]:8.1f} MiB  {time.perf_counter() - t0:6.1f} s",
            flush=True,
        )

    # Sample RSS when the loop asks for the first micro-batch of step s (k = 1: m == s), i.e.
    # after s complete optimiser steps with their logging / eval / checkpoint work dispatched,
    # and once more after the last step, before the final export.
    build = train_mod.build_run

    def build_run(c, log=print, **kw):
        r = build(c, log=log, **kw)
        batch, finish = r.batches.batch, r.finish

        def sampling_batch(m: int) -> dict:
            if m % every == 0:
                sample(m)
                if trace and m in (warmup, steps - every):
                    snaps.append(tracemalloc.take_snapshot())
            return batch(m)

        def sampling_finish(state, **kw):
            sample(r.batches.total_steps)
            if len(snaps) == 2:
                print(f"top Python allocation growth, step {warmup} -> {steps - every}:")
                for stat in snaps[1].compare_to(snaps[0], "lineno")[:15]:
                    print(f"  {stat}", flush=True)
            return finish(state, **kw)

        r.batches.batch, r.finish = sampling_batch, sampling_finish
        return r

    train_mod.build_run = build_run
    try:
        res = train_mod.train(cfg, progress=False, log=lambda s: None)
    finally:
        train_mod.build_run = build
    wall = time.perf_counter() - t0
    after_export = rss_mib()
    print(f"after export + report: rss {after_export:8.1f} MiB  {wall:6.1f} s")

    steps_arr = np.array([s for s, _ in series], float)
    rss_arr = np.array([r for _, r in series], float)
    post = steps_arr >= warmup
    at_warmup = float(rss_arr[post][0])
    slope = (
        float(np.polyfit(steps_arr[post], rss_arr[post], 1)[0] * 1000) if post.sum() > 2 else 0.0
    )
    ckpts = sorted(p.name for p in (workdir / "run" / "checkpoints").iterdir())
    n_metrics = len((workdir / "run" / "metrics.jsonl").read_text().splitlines())
    return {
        "bench": "soak",
        "steps": res.final_step,
        "wall_s": round(wall, 1),
        "steps_per_s": round(res.final_step / wall, 1),
        "checkpoint_every": 50,
        "eval_every": 100,
        "sample_every": every,
        "warmup_steps": warmup,
        "rss_mib": [[int(s), round(r, 1)] for s, r in series],
        "rss_at_warmup_mib": round(at_warmup, 1),
        "rss_end_mib": round(float(rss_arr[-1]), 1),
        "rss_max_after_warmup_mib": round(float(rss_arr[post].max()), 1),
        "rss_after_export_mib": round(after_export, 1),
        "growth_after_warmup_mib": round(float(rss_arr[-1]) - at_warmup, 1),
        "slope_mib_per_1k_steps": round(slope, 2),
        "checkpoint_dirs_left": ckpts,
        "metrics_records": n_metrics,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="RSS sample interval (steps)")
    ap.add_argument("--warmup", type=int, default=200, help="steps excluded from the growth")
    ap.add_argument("--workdir", default=None, help="keep the run here (default: a temp dir)")
    ap.add_argument(
        "--tracemalloc", action="store_true", help="print where Python memory grew (slower)"
    )
    args = ap.parse_args(argv)
    if args.tracemalloc:
        tracemalloc.start(1)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        result = run(args.steps, args.every, args.warmup, Path(args.workdir), args.tracemalloc)
    else:
        with tempfile.TemporaryDirectory(prefix="jaxlora-soak-") as d:
            result = run(args.steps, args.every, args.warmup, Path(d), args.tracemalloc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
