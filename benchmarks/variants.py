"""Measure code changes before (or after) they are made: `jaxlora bench` + patches, A/B.

Why this script exists: on a shared 2-core machine a whole-step timing moves by 10-30% with the
neighbours' load, so a change is judged by an interleaved A/B in one process (`--ab`), each
variant being the training step with some functions swapped by a patch below. Without `--ab`
it runs `jaxlora.bench.measure.run_bench` once with the patches applied and prints its JSON line.

    export PYENV_VERSION=3.12.1 PYTHONPATH=.
    python3 benchmarks/variants.py configs/bench-tiny-cpu.yaml --steps 12 \
        --ab new= --ab dense=dense_attention --ab plain=plain_ce --ab scan='|scan_layers=true'

Patches:
  dense_attention  switch off the CPU block-causal attention (models/attention.py):
                   jax.nn.dot_product_attention over all T x T scores, autodiff backward.
  plain_ce         the LM loss through autodiff of chunked log-probs instead of the fused
                   head + cross-entropy (jaxlora/fused_ce.py).
  attn_block@N     N query rows per block of the block-causal attention (default 128).
  ce_budget@MiB    fp32 logits per fused-CE chunk on CPU (default 64 MiB = 512 tokens here).
  scale_rank       LoRA scale on the [.., r] product x @ A instead of the [.., out] delta.
  fused_proj       q/k/v kernels (and gate/up) concatenated inside the step so each group is one
                   wider matmul (and one LoRA-A matmul) instead of three (two). Not adopted:
                   no gain measured (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- fused_proj


def fused_linear(x, names, variables, scale, dtype):
    """Sibling projections of the same input as one base matmul x @ [W_1 | .. | W_n] plus one
    adapter matmul x @ [A_1 | .. | A_n], then the rank-r B products.

    The frozen kernels and the trainable A's are concatenated separately: a single x @ [W | A]
    would make autodiff form the cotangent of the whole concatenation, i.e. a full dW matmul.
    names: projections reading x; variables: the attention/MLP module's variables
    ({"params": {name: {"kernel"}}, "lora": {name: {"lora_a", "lora_b"}}}).
    Returns one [.., out_i] output per name. The backward is one dX matmul per concatenation.
    """
    params, lora = variables["params"], variables.get("lora", {})
    x = x.astype(dtype)
    kernels = [params[n]["kernel"].astype(dtype) for n in names]  # [in, out_i]
    w = kernels[0] if len(kernels) == 1 else jnp.concatenate(kernels, axis=-1)
    y = x @ w  # [.., sum(out_i)]
    outs = jnp.split(y, np.cumsum([k.shape[-1] for k in kernels])[:-1], axis=-1)
    adapters = [lora.get(n) for n in names]
    a_parts = [ab["lora_a"].astype(dtype) for ab in adapters if ab is not None]  # [in, r]
    if not a_parts:
        return outs
    xa = x @ (a_parts[0] if len(a_parts) == 1 else jnp.concatenate(a_parts, axis=-1))
    xa = jnp.split(xa, np.cumsum([a.shape[-1] for a in a_parts])[:-1], axis=-1)
    j = 0
    for i, ab in enumerate(adapters):
        if ab is not None:
            outs[i] = outs[i] + (xa[j] @ ab["lora_b"].astype(dtype)) * jnp.asarray(scale, dtype)
            j += 1
    return outs


def patch_fused_proj() -> None:
    import flax.linen as nn

    from jaxlora.models import llama

    def check(cfg, adapter):
        if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias or cfg.qk_norm:
            raise NotImplementedError("fused_proj patch: no biases / q-k norms")
        if adapter is not None and (adapter.dropout > 0 or adapter.use_dora):
            raise NotImplementedError("fused_proj patch: plain LoRA only")

    class FusedAttention(llama.Attention):
        @nn.compact
        def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
            cfg = self.cfg
            check(cfg, self.adapter)
            scale = self.adapter.scale if self.adapter else 1.0
            b, t, _ = x.shape
            nh, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            v_ = self.variables
            q, k, v = fused_linear(x, ("q_proj", "k_proj", "v_proj"), v_, scale, self.dtype)
            q = llama.apply_rope(q.reshape(b, t, nh, hd), cos, sin)
            k = llama.apply_rope(k.reshape(b, t, kh, hd), cos, sin)
            v = v.reshape(b, t, kh, hd)
            out = llama.attention(q, k, v, mask, hd**-0.5, cached=cache is not None)
            (out,) = fused_linear(out.reshape(b, t, nh * hd), ("o_proj",), v_, scale, self.dtype)
            return out, None

    class FusedMLP(llama.MLP):
        @nn.compact
        def __call__(self, x):
            check(self.cfg, self.adapter)
            scale = self.adapter.scale if self.adapter else 1.0
            v_ = self.variables
            gate, up = fused_linear(x, ("gate_proj", "up_proj"), v_, scale, self.dtype)
            h = jax.nn.silu(gate) * up  # [B, T, F]
            (out,) = fused_linear(h, ("down_proj",), v_, scale, self.dtype)
            return out

    # Parameter init (random weights, checkpoint shapes) runs the original modules: the fused
    # ones only read existing params.
    originals = (llama.Attention, llama.MLP)
    fused = (FusedAttention, FusedMLP)

    def with_originals(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            llama.Attention, llama.MLP = originals
            try:
                return fn(*args, **kwargs)
            finally:
                llama.Attention, llama.MLP = fused

        return wrapper

    from jaxlora.bench import measure as bench
    from jaxlora.io import hf

    bench.random_model = with_originals(bench.random_model)
    hf.abstract_params = with_originals(hf.abstract_params)
    llama.Attention, llama.MLP = fused


def patch_dense_attention() -> None:
    """Switch off block-causal attention: jax.nn.dot_product_attention over the whole T x T."""
    from jaxlora.models import attention

    attention.ATTENTION_BLOCK = 1 << 30


def patch_attn_block(rows: int) -> None:
    """Query rows per block of the CPU block-causal attention (`attn_block@64`)."""
    from jaxlora.models import attention

    attention.ATTENTION_BLOCK = rows


def patch_ce_budget(mib: int) -> None:
    """fp32 logits budget per fused-CE chunk on CPU, in MiB (`ce_budget@32`)."""
    from jaxlora.losses import fused_ce

    fused_ce.FUSED_CE_BUDGET_BYTES = {**fused_ce.FUSED_CE_BUDGET_BYTES, "cpu": mib * 2**20}


def patch_scale_rank() -> None:
    """LoRA scale applied to the rank-r product x @ A ([.., r]) instead of the [.., out] delta,
    so the forward multiply and its backward run over r columns, not out (scale = alpha / r = 2
    here is a power of two: bitwise the same result in bf16)."""
    from jaxlora.models import linear

    def lora_delta(x, a, b, scale):
        xa = (x @ a.astype(x.dtype)) * jnp.asarray(scale, x.dtype)  # [.., r]
        return xa @ b.astype(x.dtype)  # [.., out]

    linear.lora_delta = lora_delta


def patch_plain_ce() -> None:
    """The LM loss through autodiff of chunked log-probs instead of the fused head + CE."""
    from jaxlora import losses
    from jaxlora.train import steps

    def masked_lm_loss(hidden, kernel, ids, loss_mask, segment_ids=None, *, chunk_size=None,
                       logit_softcap=None, vocab_major=False):  # fmt: skip
        logps = losses.token_logprobs(
            hidden, kernel, ids, chunk_size=chunk_size, vocab_major=vocab_major
        )
        w = losses.target_weights(loss_mask, segment_ids)
        return -jnp.sum(jnp.where(w > 0, logps * w, 0.0)), jnp.sum(w)

    steps.masked_lm_loss = masked_lm_loss


PATCHES = {
    "dense_attention": patch_dense_attention,
    "plain_ce": patch_plain_ce,
    "attn_block": patch_attn_block,
    "ce_budget": patch_ce_budget,
    "fused_proj": patch_fused_proj,
    "scale_rank": patch_scale_rank,
}


# Everything a patch may replace, so variants can be built one after another in one process.
def _patch_targets() -> list[tuple[object, str]]:
    from jaxlora.bench import measure as bench
    from jaxlora.io import hf
    from jaxlora.losses import fused_ce
    from jaxlora.models import attention, linear, llama
    from jaxlora.train import steps

    return [
        (attention, "ATTENTION_BLOCK"),
        (steps, "masked_lm_loss"),
        (fused_ce, "FUSED_CE_BUDGET_BYTES"),
        (llama, "Attention"),
        (llama, "MLP"),
        (bench, "random_model"),
        (hf, "abstract_params"),
        (linear, "lora_delta"),
    ]


def apply_patches(names: list[str], originals: dict) -> None:
    """Restore every patch target, then apply `names`."""
    for (mod, attr), value in originals.items():
        setattr(mod, attr, value)
    for name in names:
        run_patch(name)


def run_patch(name: str) -> None:
    """Apply one patch by name."""
    base, _, arg = name.partition("@")
    if base not in PATCHES:
        raise SystemExit(f"unknown patch {base!r}; choose from {', '.join(PATCHES)}")
    PATCHES[base](*([int(arg)] if arg else []))


def ab_compare(args, specs: list[str]) -> dict:
    """Build every variant's compiled step, then time them interleaved (shuffled per round) so
    a load spike on a shared machine hits all variants alike; report median and min."""
    import random
    import time

    from jaxlora.bench import measure as bench
    from jaxlora.config import load_config

    originals = {(m, a): getattr(m, a) for m, a in _patch_targets()}
    variants: dict[str, dict] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        patches, _, overrides = rest.partition("|")
        names = [p.strip() for p in patches.split(",") if p.strip()]
        extra = [o for o in overrides.split() if o]
        apply_patches(names, originals)
        cfg = load_config(args.config, [*args.overrides, *extra])
        run = bench.build_bench_run(cfg)
        batch = run.put_batch(run.batcher.get(0, 0))
        t0 = time.perf_counter()
        compiled = run.compile_step(batch)
        compile_s = time.perf_counter() - t0
        state = run.state
        for _ in range(args.warmup):
            state, m = compiled(state, run.frozen, batch)
            jax.block_until_ready(m)
        tokens = run.rows * cfg.data.cutoff_len
        variants[name] = dict(compiled=compiled, run=run, batch=batch, state=state, wall=[], cpu=[])
        variants[name].update(compile_s=compile_s, patches=names, overrides=extra, tokens=tokens)
        print(f"built {name}: compile {compile_s:.1f} s", file=sys.stderr, flush=True)
    apply_patches([], originals)
    rng = random.Random(0)
    order = list(variants)
    for _ in range(args.steps):
        rng.shuffle(order)
        for name in order:
            v = variants[name]
            t0, c0 = time.perf_counter(), time.process_time()
            v["state"], m = v["compiled"](v["state"], v["run"].frozen, v["batch"])
            jax.block_until_ready(m)
            v["wall"].append(time.perf_counter() - t0)
            v["cpu"].append(time.process_time() - c0)
            v["loss"] = float(m["loss_sum"]) / float(m["tokens"])
    out = {}
    base = None
    for name, v in variants.items():
        med, best = float(np.median(v["wall"])), min(v["wall"])
        base = base or (med, best)
        out[name] = {
            "step_s_median": med,
            "step_s_min": best,
            "cpu_s_median": float(np.median(v["cpu"])),
            "tokens_per_s_median": v["tokens"] / med,
            "tokens_per_s_best": v["tokens"] / best,
            "speedup_median": base[0] / med,
            "speedup_min": base[1] / best,
            **{k: v[k] for k in ("loss", "compile_s", "patches", "overrides")},
        }
    head = f"{'variant':14s} {'med s':>7s} {'min s':>7s} {'cpu s':>7s} {'tok/s med':>9s}"
    print(f"{head} {'x med':>6s} {'x min':>6s}  loss", file=sys.stderr)
    for name, r in out.items():
        print(
            f"{name:14s} {r['step_s_median']:7.3f} {r['step_s_min']:7.3f} {r['cpu_s_median']:7.3f}"
            f" {r['tokens_per_s_median']:9.0f} {r['speedup_median']:6.2f} {r['speedup_min']:6.2f}"
            f"  {r['loss']:.4f}",
            file=sys.stderr,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--patch", default="", help="comma list of: " + ", ".join(PATCHES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul-peak measurement")
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        help="interleaved comparison: NAME=PATCHES[|key=value ...], repeatable; the first is the "
        "baseline, e.g. --ab base= --ab fused=fused_ce --ab unroll='|scan_layers=false'",
    )
    args = ap.parse_intermixed_args(argv)
    if args.ab:
        result = ab_compare(args, args.ab)
        print(json.dumps({"ab": result, "load_avg_1m": __import__("os").getloadavg()[0]}))
        return 0
    names = [p.strip() for p in args.patch.split(",") if p.strip()]
    for name in names:
        run_patch(name)
    from jaxlora.bench import measure as bench
    from jaxlora.config import load_config

    cfg = load_config(args.config, args.overrides)
    sizes = (256,) if args.no_peak else (2048, 4096)
    result = bench.run_bench(cfg, steps=args.steps, warmup=args.warmup, matmul_sizes=sizes)
    result["patches"] = names
    result["overrides"] = args.overrides
    print(bench.format_table(result), file=sys.stderr)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
