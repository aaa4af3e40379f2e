"""Host time per micro-step spent finding the step's rows in the epoch order, for a big dataset.

Why this script exists: every micro-step asks the `Batcher` for its global rows 2 + accumulation
times (the rows, the accumulation group's targets, its tokens). The epoch order is a seeded
permutation of all N rows (regrouped by length with `group_by_length`); recomputing it per ask
cost ~0.1 s per micro-step at 1M rows, more than a GPU step. Synthetic rows (lengths 10-500
tokens), no model, no device:

    python3 benchmarks/batch_order.py --rows 1000000 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from jaxlora.data import Batcher, Example


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--accumulation", type=int, default=1)
    args = ap.parse_args(argv)
    lengths = np.random.default_rng(0).integers(10, 500, args.rows)
    pool = [Example(np.zeros(int(n), np.int32), np.ones(int(n), np.int32)) for n in lengths[:1000]]
    samples = [pool[i % len(pool)] for i in range(args.rows)]  # len() of each: the lengths
    for group in (0, args.batch * args.accumulation):
        b = Batcher(samples, batch_size=args.batch, pad_id=0, seed=0, length_group=group)
        t = time.perf_counter()
        for step in range(args.steps):
            for _ in range(2 + args.accumulation):
                b.global_indices(0, step)
        ms = 1e3 * (time.perf_counter() - t) / args.steps
        name = f"group_by_length ({group} rows)" if group else "plain shuffle"
        print(f"{name}: {ms:.1f} ms of order lookups per micro-step ({args.rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
