"""Generation speed: prefill time and time per decode step at several prompt lengths.

Why this script exists: `jaxlora chat / predict / eval`, the generation samples of an eval and
the answers printed after `jaxlora train` all run `jaxlora.evaluate.generate`. A decode step's
cost should barely grow with the cache length (it reads the cache once); it used to grow ~3x
from a 16- to a 1k-token prompt because every step copied the whole KV cache. The peer is
transformers' `generate` (PyTorch, same weights: the checkpoint jaxlora converted, fp32,
`torch.set_num_threads(2)`), run as a subprocess of `--peer-python` when given.

    PYENV_VERSION=3.12.1 python3 benchmarks/decode_speed.py --model smollm2-135m-instruct \
        --dtype float32 --prompts 16,128,1024 --batch 4 --peer-python python3

Per prompt length P (bucketed by jaxlora: 16 -> 16, 1024 -> 1024 + the new-token bucket): the
same batch is generated with 1 and with N new tokens (no stop tokens), warm (compiled) runs
only; decode step = (t_N - t_1) / (N - 1). Prints one line per (side, P) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _prompt_ids(p: int, batch: int) -> list[list[int]]:
    """The same [batch, p] token ids for both sides."""
    return [[100 + (i + j) % 1000 for i in range(p)] for j in range(batch)]


def _timed(fn, reps: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()  # compile / warm up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_jaxlora(model_name: str, dtype: str, prompts: list[int], batch: int, new: int, reps: int):
    from jaxlora.evaluate.generate import generate
    from jaxlora.io.model import load_model

    model = load_model(model_name, dtype=dtype)
    rows = []
    for p in prompts:
        ids = _prompt_ids(p, batch)

        def gen(n, ids=ids):
            return generate(model, ids, max_new_tokens=n, stop_token_ids=(), batch_size=batch)

        t1, tn = _timed(lambda: gen(1), reps), _timed(lambda: gen(new), reps)
        rows.append(
            {"side": "jaxlora", "prompt": p, "prefill_s": t1, "step_ms": _step(t1, tn, new)}
        )
    return rows, str(model.path)


def run_mixed(model_name: str, dtype: str, lengths: list[int], new: int, reps: int) -> dict:
    """One batch of prompts of different lengths, as the answers after `jaxlora train` are
    generated: the whole `generate` call, first (compile + run) and best warm."""
    from jaxlora.evaluate.generate import batch_bucket, bucket_length, generate
    from jaxlora.io.model import load_model

    model = load_model(model_name, dtype=dtype)
    ids = [[100 + (7 * i + j) % 1000 for i in range(n)] for j, n in enumerate(lengths)]

    def gen():
        return generate(model, ids, max_new_tokens=new, stop_token_ids=(), batch_size=len(ids))

    t = time.perf_counter()
    gen()
    first = time.perf_counter() - t
    shape = [batch_bucket(len(ids)), bucket_length(max(lengths)) + bucket_length(new)]
    warm = _timed(gen, reps, warm_up=False)  # the first call above compiled it
    return {"lengths": lengths, "new": new, "slots": shape, "first_s": first, "warm_s": warm}


def run_hf(path: str, prompts: list[int], batch: int, new: int, reps: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for p in prompts:
        ids = torch.tensor(_prompt_ids(p, batch))

        def gen(n, ids=ids):
            with torch.no_grad():
                kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)

        t1, tn = _timed(lambda: gen(1), reps), _timed(lambda: gen(new), reps)
        rows.append({"side": "hf", "prompt": p, "prefill_s": t1, "step_ms": _step(t1, tn, new)})
    return rows


def _step(t1: float, tn: float, new: int) -> float:
    return 1e3 * (tn - t1) / (new - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompts", default="16,128,1024", help="prompt lengths, comma separated")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=64, help="new tokens of the long run")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per point, >= 1 (best kept)")
    ap.add_argument("--peer-python", default=None, help="run transformers' generate with this")
    ap.add_argument(
        "--mixed",
        default=None,
        help="instead: prompt lengths of ONE batch (e.g. 719,600,439), jaxlora only; times the "
        "whole generate call of --new tokens (first call and best warm)",
    )
    ap.add_argument("--hf-path", default=None, help=argparse.SUPPRESS)  # the peer subprocess
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    if args.mixed:
        lengths = [int(x) for x in args.mixed.split(",")]
        r = run_mixed(args.model, args.dtype, lengths, args.new, args.reps)
        print(f"jaxlora {lengths} -> rows x slots {r['slots']}: first call {r['first_s']:.2f} s, "
              f"warm {r['warm_s']:.2f} s")  # fmt: skip
        print(json.dumps({"model": args.model, "dtype": args.dtype, **r}))
        return 0
    prompts = [int(x) for x in args.prompts.split(",")]
    if args.hf_path:
        print(json.dumps(run_hf(args.hf_path, prompts, args.batch, args.new, args.reps)))
        return 0
    rows, path = run_jaxlora(args.model, args.dtype, prompts, args.batch, args.new, args.reps)
    if args.peer_python:
        cmd = [*args.peer_python.split(), __file__, "--hf-path", path, "--prompts", args.prompts]
        cmd += ["--batch", str(args.batch), "--new", str(args.new), "--reps", str(args.reps)]
        # Under `pyenv exec` PATH starts with this interpreter's bin dir: drop it (and the
        # version pin) so `python3` resolves as in a fresh shell.
        env = {k: v for k, v in os.environ.items() if k != "PYENV_VERSION"}
        parts = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join(p for p in parts if "/.pyenv/versions/" not in p)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"the transformers side failed:\n{proc.stderr[-3000:]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    for r in rows:
        print(
            f"{r['side']:8s} batch {args.batch} prompt {r['prompt']:5d}: "
            f"prefill + 1 token {r['prefill_s']:6.2f} s, decode step {r['step_ms']:6.1f} ms"
        )
    print(json.dumps({"model": args.model, "dtype": args.dtype, "batch": args.batch, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
