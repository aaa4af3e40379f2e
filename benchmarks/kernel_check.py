"""GPU/TPU attention kernels vs the dense XLA reference, packed T = 2048, forward + q/k/v grads.

Run by benchmarks/device_check.sh on an accelerator box (works on CPU too, with
`--interpret`, at a small T). One JSON line per kernel on stdout (and appended to
$OUT/kernels.jsonl when OUT is set): relative errors of the output and the three gradients
against `jax.nn.dot_product_attention` with the same mask (bf16 inputs; the reference is the
fp32 dense result, and the dense bf16 error is printed beside it), plus fwd+bwd milliseconds.

    python3 benchmarks/kernel_check.py [--t 2048] [--kernels cudnn,pallas] [--interpret]
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


def _rel(x, y) -> float:
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kernels", default=None, help="comma list (default: per platform)")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU)")
    args = ap.parse_args()
    platform = jax.default_backend()
    default = {"gpu": "cudnn,pallas,block", "tpu": "splash,block"}.get(platform, "splash,pallas")
    kernels = (args.kernels or default).split(",")
    shape = (args.batch, args.t, args.heads, args.kv_heads, args.head_dim)
    scale = args.head_dim**-0.5
    q32, k32, v32, g, seg = _inputs(*shape, jnp.float32)
    mask = A.causal_mask(seg)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)

    exact, _ = _run(dense, q32, k32, v32, g, seg)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    dense16, dense_ms = _run(dense, q, k, v, g, seg)
    base = {"platform": platform, "device": str(jax.devices()[0].device_kind), "shape": shape}
    names = ("out", "dq", "dk", "dv")
    lines = [{**base, "kernel": "xla", "ms_fwd_bwd": round(dense_ms, 3)}]
    lines[0].update(
        {f"rel_err_{n}": _rel(x, e) for n, x, e in zip(names, dense16, exact, strict=True)}
    )
    fns = {
        "cudnn": lambda q, k, v: flash.cudnn(q, k, v, seg, scale, None),
        "pallas": lambda q, k, v: flash.pallas_gpu(q, k, v, seg, scale, args.interpret),
        "splash": lambda q, k, v: flash.splash(q, k, v, seg, scale, None, args.interpret),
        "block": lambda q, k, v: A.block_causal_attention(q, k, v, mask, scale, 128),
    }
    for name in kernels:
        line = {**base, "kernel": name}
        try:
            got, ms = _run(fns[name], q, k, v, g, seg)
            line["ms_fwd_bwd"] = round(ms, 3)
            for n, x, d, e in zip(names, got, dense16, exact, strict=True):
                line[f"rel_err_{n}"] = _rel(x, e)
                line[f"ok_{n}"] = (
                    bool(jnp.all(jnp.isfinite(x))) and _rel(x, e) <= 2 * _rel(d, e) + 1e-3
                )
        except Exception as e:  # report and go on: one broken kernel must not hide the others
            line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        lines.append(line)
    out_dir = os.environ.get("OUT")
    for line in lines:
        print(json.dumps(line), flush=True)
        if out_dir:
            with open(os.path.join(out_dir, "kernels.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
