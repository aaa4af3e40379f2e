"""GPU/TPU attention kernels vs the dense XLA reference, T = 2048, forward + q/k/v grads.

Run by benchmarks/device_check.sh on an accelerator box (works on CPU too, with
`--interpret`, at a small T, for the Pallas kernels). One JSON line per kernel on stdout (and
appended to $OUT/kernels.jsonl when OUT is set): relative errors of the output and the three
gradients against `jax.nn.dot_product_attention` with the same mask (bf16 inputs; the
reference is the fp32 dense result, and the dense bf16 error is printed beside it), `ok_*`
(finite and within 2x the dense bf16 error, or one bf16 step 2^-7 of the largest value),
plus fwd+bwd milliseconds.

Kernels, each on the row layout it is used for (models/attention.py `select`):
  cudnn         unpacked rows (one sample, then padding; a dummy all-padding row): padding as
                sequence lengths -- what `attention: auto` runs on a GPU for unpacked data
  cudnn-packed  packed rows as a boolean [B,1,T,T] same-segment mask (JAX turns it into an
                additive bias) -- only with an explicit `attention: cudnn` on packed data
  pallas        packed rows, segment ids -- what `auto` runs on a GPU for packed data
  splash, block packed rows (TPU; the CPU kernel)

    python3 benchmarks/kernel_check.py [--t 2048] [--kernels cudnn,cudnn-packed,pallas]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from jaxlora.models import attention as A
from jaxlora.models import flash

BF16_STEP = 2.0**-7  # relative spacing of bf16 numbers near 1 (8 significand bits)


def _right_padded(b, t):
    """[B, T] rows of one sample then padding: 80% real, full, all padding (a dummy row)."""
    pos = jnp.arange(t)
    rows = [jnp.where(pos < t - t // 5, 1, 0), jnp.ones(t, jnp.int32), jnp.zeros(t, jnp.int32)]
    return jnp.stack([rows[i % 3] for i in range(b)]).astype(jnp.int32)


def _inputs(b, t, n, k, dh, dtype):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, dh), jnp.float32)
    kk = jax.random.normal(ks[1], (b, t, k, dh), jnp.float32)
    v = jax.random.normal(ks[2], (b, t, k, dh), jnp.float32)
    g = jax.random.normal(ks[3], (b, t, n, dh), jnp.float32)
    # Packed rows: samples of 700 / 900 / rest tokens, then 100 padding tokens in row 0.
    cuts = [int(t * 0.34), int(t * 0.78), t - t // 20]
    pos = jnp.arange(t)
    row0 = jnp.where(pos < cuts[0], 1, jnp.where(pos < cuts[1], 2, jnp.where(pos < cuts[2], 3, 0)))
    row1 = jnp.where(pos < t // 2, 1, 2)
    seg = jnp.stack([row0, row1][:b] + [row1] * max(0, b - 2)).astype(jnp.int32)
    return q.astype(dtype), kk.astype(dtype), v.astype(dtype), g, seg


def _run(fn, q, k, v, g, seg):
    real = (seg != 0)[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v).astype(jnp.float32) * g, 0.0))

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    out = jax.jit(fn)(q, k, v).astype(jnp.float32)
    _, grads = fwd_bwd(q, k, v)
    jax.block_until_ready(grads)
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(fwd_bwd(q, k, v))
    ms = (time.perf_counter() - t0) / 5 * 1e3
    return [jnp.where(real, out, 0.0), *(x.astype(jnp.float32) for x in grads)], ms


def emit(line: dict, filename: str) -> None:
    """One JSON result line on stdout, and appended to $OUT/<filename> when OUT is set (the
    device tool brings $OUT back)."""
    print(json.dumps(line), flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, filename), "a") as f:
            f.write(json.dumps(line) + "\n")


def _rel(x, y) -> float:
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernels", default=None, help="comma list (default: per platform)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU)")
    args = ap.parse_args()
    platform = jax.default_backend()
    default = {"gpu": "cudnn,cudnn-packed,pallas,block", "tpu": "splash,block"}
    kernels = (args.kernels or default.get(platform, "splash,pallas")).split(",")
    shape = (args.batch, args.t, args.heads, args.kv_heads, args.head_dim)
    scale = args.head_dim**-0.5
    q32, k32, v32, g, packed = _inputs(*shape, jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    layouts = {"packed": packed, "right_padded": _right_padded(args.batch, args.t)}
    base = {"platform": platform, "device": str(jax.devices()[0].device_kind), "shape": shape}
    names = ("out", "dq", "dk", "dv")
    lines, refs = [], {}
    for layout, seg in layouts.items():
        mask = A.causal_mask(seg)

        def dense(q, k, v, mask=mask):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

        exact, _ = _run(dense, q32, k32, v32, g, seg)
        dense16, dense_ms = _run(dense, q, k, v, g, seg)
        refs[layout] = exact, dense16
        line = {**base, "kernel": "xla", "rows": layout, "ms_fwd_bwd": round(dense_ms, 3)}
        line.update(
            {f"rel_err_{n}": _rel(x, e) for n, x, e in zip(names, dense16, exact, strict=True)}
        )
        lines.append(line)
    fns = {  # kernel -> (row layout, fn(q, k, v, seg))
        "cudnn": ("right_padded", lambda q, k, v, s: flash.cudnn(q, k, v, s, scale, None, True)),
        "cudnn-packed": ("packed", lambda q, k, v, s: flash.cudnn(q, k, v, s, scale, None, False)),
        "pallas": (
            "packed",
            lambda q, k, v, s: flash.pallas_gpu(q, k, v, s, scale, args.interpret),
        ),
        "splash": (
            "packed",
            lambda q, k, v, s: flash.splash(q, k, v, s, scale, None, args.interpret),
        ),
        "block": (
            "packed",
            lambda q, k, v, s: A.block_causal_attention(q, k, v, A.causal_mask(s), scale, 128),
        ),
    }
    for name in kernels:
        layout, fn = fns[name]
        seg = layouts[layout]
        exact, dense16 = refs[layout]
        line = {**base, "kernel": name, "rows": layout}
        try:
            got, ms = _run(lambda q, k, v, fn=fn, seg=seg: fn(q, k, v, seg), q, k, v, g, seg)
            line["ms_fwd_bwd"] = round(ms, 3)
            for n, x, d, e in zip(names, got, dense16, exact, strict=True):
                line[f"rel_err_{n}"] = _rel(x, e)
                # A wrong mask or offset shows as errors of order 0.1-1; bf16 rounding of the
                # kernel's own accumulation order stays within 2x dense or one bf16 step.
                tol = max(2 * _rel(d, e), BF16_STEP)
                line[f"ok_{n}"] = bool(jnp.all(jnp.isfinite(x))) and _rel(x, e) <= tol
        except Exception as e:  # report and go on: one broken kernel must not hide the others
            line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        lines.append(line)
    for line in lines:
        emit(line, "kernels.jsonl")


if __name__ == "__main__":
    main()
