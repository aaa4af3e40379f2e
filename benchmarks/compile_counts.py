"""How many times a run compiles its train step: length buckets old (multiples of 64) vs doubling.

Why this script exists: on a short fine-tuning run XLA compiles can cost more than the steps
(`time/compile_s` in the breakdown at the end of every `jaxlora train`), and the train step is
compiled once per distinct batch length plus, before this change, once more for the pre-flight
memory check at `cutoff_len` when no batch had that length. The count is deterministic: this
script tokenises a dataset (the built-in tiny byte-level tokenizer, or `--model DIR`'s), walks
every batch of every epoch in the run's own order and prints the distinct lengths each scheme
gives, and the same for `group_by_length: true` (HF's length-grouped order: batches of
similar-length rows), and the planned lengths a run on a `--params`-sized base would add
(`plan_buckets`, with the train command's compile-cost estimate for `--platform`). No model is run.

    python3 benchmarks/compile_counts.py --dataset /work/shared/data/llamafactory/identity.json
    python3 benchmarks/compile_counts.py \
        --dataset /work/shared/data/llamafactory/alpaca_en_demo.json --cutoff 1024
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxlora.data import load_sft_dataset
from jaxlora.data.batching import Batcher, plan_buckets
from jaxlora.data.loading import resolve_demo_names


def multiple_of_64(n: int, cutoff: int) -> int:
    """The rule before doubling buckets: n rounded up to a multiple of 64, capped at cutoff."""
    return min(max(64, -(-n // 64) * 64), cutoff)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", help="an HF model dir whose tokenizer to use (default: tiny)")
    ap.add_argument("--cutoff", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--params", type=float, default=135e6, help="base size for the planned lengths")
    ap.add_argument("--platform", default="cpu", help="cpu | gpu | tpu (the compile-cost estimate)")
    args = ap.parse_args(argv)
    if args.model:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
    else:
        from jaxlora.io.tiny import build_tokenizer

        tok = build_tokenizer(None, template="chatml")
    train, _, _ = load_sft_dataset(
        tok, dataset=resolve_demo_names(args.dataset), cutoff_len=args.cutoff
    )
    b = Batcher(train, batch_size=args.batch, pad_id=0, cutoff_len=args.cutoff, seed=0)
    g = Batcher(
        train,
        batch_size=args.batch,
        pad_id=0,
        cutoff_len=args.cutoff,
        seed=0,
        length_group=args.batch,
    )
    new, old, grouped = set(), set(), set()
    slots_new = slots_old = slots_grouped = 0  # B x T token slots the steps compute
    real = sum(len(s) for s in train) * args.epochs
    for epoch in range(args.epochs):
        for step in range(len(b)):
            t_grouped = g.get(epoch, step)["input_ids"].shape[1]
            grouped.add(t_grouped)
            slots_grouped += args.batch * t_grouped
            idx = b.global_indices(epoch, step)
            longest = max(len(train[i]) for i in idx if i >= 0)
            t_new = b.get(epoch, step)["input_ids"].shape[1]
            t_old = multiple_of_64(longest, args.cutoff)
            new.add(t_new)
            old.add(t_old)
            slots_new += args.batch * t_new
            slots_old += args.batch * t_old
    from jaxlora.train.batches import COMPILE_FLOPS, COMPILE_FLOPS_ACCELERATOR

    cost = COMPILE_FLOPS.get(args.platform, COMPILE_FLOPS_ACCELERATOR) / (6 * args.params)
    longest = b.step_longest(args.epochs * len(b))
    b.buckets = plan_buckets(longest, args.batch, args.cutoff, cost)
    slots_planned = args.batch * sum(b.length_for(int(n)) for n in longest)
    # Before: the pre-flight check compiled at cutoff_len whether or not a batch reached it.
    old_compiles = len(old | {args.cutoff})
    new_compiles = len(new | {b.longest_length()})  # now: at the longest bucket, one of `new`
    out = {
        "dataset": args.dataset,
        "rows": len(train),
        "cutoff_len": args.cutoff,
        "batch": args.batch,
        "epochs": args.epochs,
        "max_row_tokens": max(len(s) for s in train),
        "lengths_multiple_of_64": sorted(old),
        "lengths_doubling": sorted(new),
        "train_step_compiles_before": old_compiles,
        "train_step_compiles_now": new_compiles,
        "token_slots_before": slots_old,
        "token_slots_now": slots_new,
        "lengths_group_by_length": sorted(grouped),
        "train_step_compiles_group_by_length": len(grouped | {g.longest_length()}),
        "token_slots_group_by_length": slots_grouped,
        "lengths_planned": list(b.buckets),
        "token_slots_planned": slots_planned,
        "real_tokens": real,
    }
    print(
        f"{args.dataset}: {len(train)} rows, longest {out['max_row_tokens']} tokens, cutoff "
        f"{args.cutoff}, batch {args.batch}: train_step compiles {old_compiles} -> {new_compiles}"
        f" (lengths {sorted(old)} + pre-flight {args.cutoff} -> {sorted(new)}); padded token "
        f"slots x{slots_new / slots_old:.2f}; group_by_length: compiles "
        f"{out['train_step_compiles_group_by_length']} (lengths {sorted(grouped)}), slots "
        f"x{slots_grouped / slots_new:.2f} of now; real tokens / slots {real / slots_new:.2f} now, "
        f"{real / slots_grouped:.2f} grouped; planned for {args.params:.3g} parameters on "
        f"{args.platform}: lengths {list(b.buckets)}, slots x{slots_planned / slots_new:.2f} of now"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
