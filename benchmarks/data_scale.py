"""Data pipeline at scale: rows/s and peak RSS of SFT data loading for N alpaca-style rows.

Why this exists: issue 17 (tokenized cache, memory flat in dataset size, parallel
tokenisation). Each measurement runs in a fresh subprocess so its peak RSS (``ru_maxrss``) is
its own. Rows are synthetic alpaca rows (instruction / input / output of varied lengths, seeded),
written once as JSON Lines; with ``--demo`` they are LLaMA-Factory's ``alpaca_en_demo`` rows
repeated instead, each instruction prefixed with its row number so no two rows are equal (read
from /work/shared, never copied into the repo). Besides wall seconds, each line gives the CPU
seconds of the loading process plus its tokenising workers (``cpu_s``): on a shared machine the
wall time depends on what else runs, the CPU cost per row much less.

    PYTHONPATH=$PWD python3 benchmarks/data_scale.py --rows 50000 200000 1000000 --workers 2

``--before`` calls the pipeline with only the arguments the pre-cache API had (run it with
PYTHONPATH pointing at an older checkout). Otherwise each size is loaded twice with an empty
cache directory: "cold" (tokenise + write the cache) and "warm" (the second run, cache hit).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_WORDS = (
    "the model data train answer question explain summary write list give short long code "
    "python function value result number table city river music history science reason step "
    "first second because however therefore example simple describe compare better"
).split()
_DEMO = Path("/work/shared/data/llamafactory/alpaca_en_demo.json")


def write_rows(path: Path, n: int, demo: bool, short: bool = False) -> None:
    """n alpaca rows as JSON Lines (synthetic, or the demo rows repeated; ``short``: synthetic
    rows of a few words, to measure memory against the row count in less time)."""
    rng = random.Random(0)
    lo_i, hi_i, lo_o, hi_o = (2, 6, 2, 10) if short else (5, 40, 10, 150)
    demo_rows = json.loads(_DEMO.read_text()) if demo else None
    with path.open("w") as f:
        for i in range(n):
            if demo_rows:
                row = dict(demo_rows[i % len(demo_rows)])
                row["instruction"] = f"{i}: {row['instruction']}"
            else:

                def words(lo: int, hi: int) -> str:
                    return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))

                row = {
                    "instruction": f"{i}: " + words(lo_i, hi_i),
                    "input": "" if short or rng.random() >= 0.4 else words(0, 30),
                    "output": words(lo_o, hi_o),
                }
            f.write(json.dumps(row) + "\n")


def _cpu() -> float:
    """User + system CPU seconds of this process and its waited-for children (workers)."""
    t = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        t += r.ru_utime + r.ru_stime
    return t


def child(path: str, before: bool, workers: int, cache: str) -> None:
    """One load in this process; prints seconds, samples and peak RSS as JSON."""
    from jaxlora.data import load_sft_dataset
    from jaxlora.io.tiny import build_tokenizer

    tok = build_tokenizer(None, template="chatml")
    kw = {} if before else {"num_workers": workers, "cache_dir": cache}
    t0 = time.perf_counter()
    c0 = _cpu()
    train, _, report = load_sft_dataset(tok, dataset=path, cutoff_len=1024, **kw)
    # Touch every 1000th sample, as a batcher would (memory-mapped rows are read lazily).
    touched = sum(len(train[i]) for i in range(0, len(train), 1000))
    dt = time.perf_counter() - t0
    cpu = _cpu() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The largest tokenising worker (the pool is shut down, so its processes were waited for).
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out = {"seconds": dt, "cpu": cpu, "samples": len(train), "touched": touched, "rss": rss}
    print(json.dumps({**out, "worker_rss": workers}))


def measure(path: Path, rows: int, before: bool, workers: int, cache: str, label: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--workers", str(workers)]
    cmd += ["--cache", cache] + (["--before"] if before else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    res = {
        "run": label,
        "rows": rows,
        "workers": 0 if before else workers,
        "seconds": round(r["seconds"], 2),
        "rows_per_s": round(rows / r["seconds"], 1),
        "cpu_s": round(r.get("cpu", 0.0), 2),
        "load": round(os.getloadavg()[0], 1),
        "peak_rss_mb": round(r["rss"] / 2**20, 1),
        "worker_peak_rss_mb": round(r.get("worker_rss", 0) / 2**20, 1),
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--before", action="store_true", help="pre-cache API (older checkout)")
    ap.add_argument("--demo", action="store_true", help="repeat alpaca_en_demo rows")
    ap.add_argument("--short", action="store_true", help="synthetic rows of a few words")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.before, args.workers, args.cache)
        return
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        for n in args.rows:
            path = Path(tmp) / f"alpaca_{n}.jsonl"
            write_rows(path, n, args.demo, args.short)
            if args.before:
                measure(path, n, True, 1, "", "before")
                continue
            cache = str(Path(tmp) / f"cache_{n}")
            measure(path, n, False, args.workers, cache, "cold")
            measure(path, n, False, args.workers, cache, "warm")
            path.unlink()


if __name__ == "__main__":
    main()
