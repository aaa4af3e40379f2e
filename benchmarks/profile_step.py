"""Where the time of one `jaxlora bench` train step goes: an XLA-thunk profile of the real step.

Why this script exists: tuning needs evidence. It builds the exact step `jaxlora bench` times
(same config, same random full rows), runs `--warmup` steps, traces `--steps` more with
`jax.profiler`, and reads the trace back with `jax.profiler.ProfileData` (no TensorBoard needed).
On CPU every HLO thunk (a fusion, a YNNPACK/XNNPACK dot fusion, a copy, a while loop) is one
event on an executor thread; the script sums them per thunk name, maps each name to its HLO
instruction (so a fusion shows its root op and whether it holds a dot) and prints:

  * wall time per step and the share spent in dot-holding thunks vs everything else,
  * the top thunks by total time with their HLO category and per-step milliseconds.

    PYENV_VERSION=3.12.1 python3 benchmarks/profile_step.py configs/bench-tiny-cpu.yaml
    PYENV_VERSION=3.12.1 python3 benchmarks/profile_step.py configs/bench-tiny-cpu.yaml remat=full
    PYENV_VERSION=3.12.1 python3 benchmarks/profile_step.py configs/bench-tiny-cpu.yaml \
        --patch fused_ce      # with a proposed change (benchmarks/variants.py)

Event durations on different threads overlap (2 cores), so shares are of summed thunk time.
Nested events (a while loop containing its body's thunks) are counted at the innermost level.
On a GPU the events are the kernels on the device's streams, named by their HLO instruction
(`gpu_events`); the same tables follow.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

from jaxlora.bench import measure as bench
from jaxlora.config import load_config

SKIP = ("ThreadpoolListener", "end: ", "ThunkExecutor", "SlinkyThreadPool", "Await")
CONTAINERS = ("while", "call", "conditional")  # their time is the time of the thunks inside


# Model part of an HLO instruction, from the op_name JAX records in its metadata (first match).
SCOPES = (
    ("attention core", ("vmap(", "BTNH", "btkgd", "bkgts", "dot_product_attention", "reduce_max")),
    ("q/k/v/o projections", ("q_proj", "k_proj", "v_proj", "o_proj", "self_attn/dot_general")),
    ("mlp projections", ("gate_proj", "up_proj", "down_proj", "mlp/dot_general")),
    ("rope", ("self_attn/mul", "self_attn/neg", "self_attn/concatenate", "self_attn/split",
              "self_attn/pad", "/cos", "/sin")),
    ("mlp activation", ("mlp/logistic", "mlp/mul", "silu")),
    ("rms norm", ("rsqrt", "layernorm", "/norm/")),
    ("lm head + loss", ("d,dv->", "cd,dv", "cv,dv", "logsumexp", "take_along_axis", "exp",
                        "one_hot", "reduce_sum", "jvp()/while", "convert_element_type")),
    ("optimizer", ("adam", "scale_by", "apply_updates", "optax", "sqrt")),
)  # fmt: skip


def hlo_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> model part (see SCOPES), from its metadata op_name."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        name, op = m.group(1), m.group(2)
        out[name] = next((s for s, keys in SCOPES if any(k in op for k in keys)), "other")
    return out


def hlo_bodies(hlo_text: str) -> dict[str, str]:
    """HLO computation name -> its body text."""
    found = re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)
    return {m.group(1): m.group(2) for m in found}


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> short category ("dot", "fusion[reduce]", "copy", ...)."""
    bodies = hlo_bodies(hlo_text)  # to see what a fusion holds
    cats: dict[str, str] = {}
    pattern = r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z\-]+)\((.*)$"
    for m in re.finditer(pattern, hlo_text, re.M):
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if op == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            body = bodies.get(called.group(1), "") if called else ""
            has_dot = " dot(" in body or " convolution(" in body
            roots = re.findall(r"ROOT %?[\w.\-]+ = [^=]*? ([a-z\-]+)\(", body)
            root = roots[0] if roots else "?"
            cats[name] = f"dot-fusion[{root}]" if has_dot else f"fusion[{root}]"
        else:
            cats[name] = op
    return cats


def _shape(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def hlo_dot_shapes(hlo_text: str) -> dict[str, tuple[float, str]]:
    """Dot-holding fusion name -> (FLOPs per execution, "MxKxN" of its dot, batch folded in M)."""
    bodies = hlo_bodies(hlo_text)
    out = {}
    for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? fusion\(.*?calls=%?([\w.\-]+)", hlo_text, re.M
    ):
        body = bodies.get(m.group(2), "")
        d = re.search(
            r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?[\w.\-]+\)"
            r".*?lhs_contracting_dims=\{([\d,]*)\}",
            body,
        )
        if not d:
            continue
        lhs = re.search(rf"%?{re.escape(d.group(2))} = \w+\[([\d,]*)\]", body)
        if not lhs:
            continue
        out_dims, lhs_dims = _shape(d.group(1)), _shape(lhs.group(1))
        k = 1
        for i in _shape(d.group(3)):
            k *= lhs_dims[i]
        n_out = 1
        for x in out_dims:
            n_out *= x
        n = out_dims[-1] if out_dims else 1
        out[m.group(1)] = (2.0 * n_out * k, f"{n_out // max(n, 1)}x{k}x{n}")
    return out


def cpu_events(data, steps: int, cats: dict[str, str]):
    """(ms per step, count per step) by HLO thunk name, from the CPU executor threads."""
    per_name: dict[str, float] = collections.Counter()
    per_count: dict[str, float] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLAExecute" not in line.name and "XLAEigen" not in line.name:
                continue
            for ev in line.events:
                name = ev.name
                if any(name.startswith(s) for s in SKIP):
                    continue
                if cats.get(name, "") in CONTAINERS:
                    continue
                per_name[name] += ev.duration_ns / 1e6 / steps  # ms per step
                per_count[name] += 1 / steps
    return per_name, per_count


def gpu_events(data, steps: int):
    """(ms per step, count per step) by HLO instruction, from the GPU's kernel events.

    On a GPU the device plane ("/device:GPU:0") has one line per CUDA stream; each event is a
    kernel (a cuBLAS/cuDNN/Triton kernel or an XLA fusion) whose `hlo_op` stat names the HLO
    instruction that launched it, so the same HLO maps (categories, model parts) apply. Events
    without an `hlo_op` (memcpy, ...) count under their kernel name. Stream busy time, not wall.
    """
    per_name: dict[str, float] = collections.Counter()
    per_count: dict[str, float] = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                name = str(stats.get("hlo_op") or ev.name)
                per_name[name] += ev.duration_ns / 1e6 / steps
                per_count[name] += 1 / steps
    return per_name, per_count


def build(cfg_path: str, overrides: list[str]):
    cfg = load_config(cfg_path, overrides)
    run = bench.build_bench_run(cfg)
    batch = run.put_batch(run.batcher.get(0, 0))
    compiled = run.compile_step(batch)
    return compiled, run, batch, run.rows * cfg.data.cutoff_len


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo-out", default=None, help="write the optimised HLO text here")
    ap.add_argument("--patch", default="", help="benchmarks/variants.py patches to apply first")
    args = ap.parse_intermixed_args(argv)
    if args.patch:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import variants

        for name in args.patch.split(","):
            variants.run_patch(name.strip())

    compiled, run, batch, tokens = build(args.config, args.overrides)
    hlo = compiled.as_text()
    if args.hlo_out:
        with open(args.hlo_out, "w") as f:
            f.write(hlo)
    cats = hlo_categories(hlo)
    state = run.state
    for _ in range(args.warmup):
        state, m = compiled(state, run.frozen, batch)
        jax.block_until_ready(m)
    trace_dir = tempfile.mkdtemp(prefix="jaxlora-prof-")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, m = compiled(state, run.frozen, batch)
            jax.block_until_ready(m)
    wall = (time.perf_counter() - t0) / args.steps
    path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)

    if any(plane.name.startswith("/device:GPU") for plane in data.planes):
        per_name, per_count = gpu_events(data, args.steps)
    else:
        per_name, per_count = cpu_events(data, args.steps, cats)
    total = sum(per_name.values())
    per_cat: dict[str, float] = collections.Counter()
    for name, ms in per_name.items():
        cat = cats.get(name, "?")
        per_cat["dot" if cat.startswith(("dot", "convolution")) else "other"] += ms
    print(f"wall {1e3 * wall:.1f} ms/step ({tokens / wall:,.0f} tokens/s under the profiler)")
    print(f"summed thunk/kernel time {total:.1f} ms/step over executor threads or GPU streams")
    for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {k:6s} {v:8.1f} ms  {100 * v / max(total, 1e-9):5.1f}%")
    by_cat: dict[str, float] = collections.Counter()
    for name, ms in per_name.items():
        by_cat[cats.get(name, "?")] += ms
    print("by HLO category:")
    for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {k:40s} {v:8.1f} ms  {100 * v / max(total, 1e-9):5.1f}%")
    scopes = hlo_scopes(hlo)
    by_scope: dict[str, float] = collections.Counter()
    for name, ms in per_name.items():
        by_scope[scopes.get(name, "other")] += ms
    print("by model part (from HLO metadata):")
    for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1]):
        print(f"  {k:24s} {v:8.1f} ms  {100 * v / max(total, 1e-9):5.1f}%")
    # Dot efficiency by shape: thin dots (a side <= 64: LoRA rank, per-head attention) vs the rest.
    dots = hlo_dot_shapes(hlo)
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for name, ms in per_name.items():
        if name in dots:
            flops, mkn = dots[name]
            thin = min(int(x) for x in mkn.split("x")) <= 64
            g = groups["thin dots (a side <= 64)" if thin else "wide dots"]
            g[0] += ms
            g[1] += flops * per_count[name]
    print("dot efficiency (executed dot FLOPs, per step):")
    for k, (ms, fl) in sorted(groups.items()):
        rate = fl / (ms / 1e3) / 1e9 if ms else 0.0
        print(f"  {k:26s} {ms:8.1f} ms  {fl / 1e9:7.1f} GFLOP  {rate:6.0f} GFLOP/s")
    print(f"top {args.top} thunks (ms per step):")
    for name, ms in sorted(per_name.items(), key=lambda kv: -kv[1])[: args.top]:
        cat, scope = cats.get(name, "?"), scopes.get(name, "other")
        print(f"  {name:36s} {cat:26s} {scope:20s} {ms:8.2f}  {100 * ms / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
