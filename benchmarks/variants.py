"""Measure proposed changes to model/loss code before they are made: `jaxlora bench` + patches.

Why this script exists: the benchmark owner may not edit `jaxlora/losses.py` or
`jaxlora/models/*.py`, but a proposal to their owners should come with a measured gain. Each
`--patch` below swaps one function/class of the training code for the proposed version in this
process only, then runs the unchanged `jaxlora.bench.run_bench` (the training step builders) and
prints its JSON line (with the patch list added). Run one process per variant so compile caches
and XLA_FLAGS stay separate:

    export PYENV_VERSION=3.12.1
    python3 benchmarks/variants.py configs/bench-tiny-cpu.yaml --patch head_bf16_grad
    python3 benchmarks/variants.py configs/bench-tiny-cpu.yaml --patch fused_ce,attn_bias

Patches (each is the exact code proposed for the named file; see benchmarks/RESULTS.md):
  head_bf16_grad  losses._chunk_logprobs: the LM-head matmul gets a custom VJP whose backward
                  runs bf16 x bf16 (fp32 accumulate) like the forward; by default JAX's transpose
                  of a bf16 x bf16 -> fp32 dot promotes the frozen [D, V] kernel to fp32 and runs
                  the dX matmul in fp32.
  fused_ce        steps.masked_lm_loss -> fused linear cross-entropy: the loss and its gradient
                  w.r.t. the hidden states (and the head, only when it is trained) are computed
                  chunk by chunk in the forward pass, so [tokens, V] logits are never stored and
                  never recomputed; the backward only scales the saved gradient.
  attn_bias       llama: attention through an additive [B, 1, 1, T, S] bias built once per step
                  (0 / -1e30) instead of jax.nn.dot_product_attention's boolean `where`, whose
                  linearisation inside the layer scan materialises [L, ..., T, S] constants.
  attn_remat      attn_bias with the attention core under jax.checkpoint (recompute the
                  probabilities in the backward instead of saving [L, B, N, T, S] of them).
  attn_blocks     llama: block-causal attention (`attn_blocks@128`: query blocks of 128 attend
                  only to the keys at or before their block; exact, skips ~44% of the scores).
  rope_barrier    llama: `jax.lax.optimization_barrier` on the RoPE cos/sin so XLA does not
                  fuse (recompute) the trigonometry into every RoPE fusion of every head/layer.
  fused_proj      llama: q/k/v kernels (and gate/up) concatenated inside the step so each group
                  is one wider matmul (and one LoRA-A matmul) instead of three (two).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- head_bf16_grad


@jax.custom_vjp
def head_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """fp32 logits of a bf16 [.., D] x [D, V] product; backward also bf16 x bf16."""
    return jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)


def _head_fwd(h, w):
    return head_logits(h, w), (h, w)


def _head_bwd(res, g):
    h, w = res
    gc = g.astype(w.dtype)  # [.., V] cotangent in the compute dtype (as autocast does)
    dh = jnp.einsum("...v,dv->...d", gc, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("...d,...v->dv", h, gc, preferred_element_type=jnp.float32)
    # dw is dead code (removed by XLA) when the head is frozen.
    return dh.astype(h.dtype), dw.astype(w.dtype)


head_logits.defvjp(_head_fwd, _head_bwd)


def patch_head_bf16_grad() -> None:
    from jaxlora import losses

    def _chunk_logprobs(hidden, kernel, targets, logit_softcap):
        dtype = jnp.promote_types(hidden.dtype, kernel.dtype)
        logits = head_logits(hidden.astype(dtype), kernel.astype(dtype))  # [..., V] fp32
        if logit_softcap is not None:
            logits = logit_softcap * jnp.tanh(logits / logit_softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return target_logit - lse

    losses._chunk_logprobs = _chunk_logprobs


# ----------------------------------------------------------------------------- fused_ce

FUSED_CHUNK = 256  # tokens per chunk: [256, V] fp32 logits = 32 MiB at V = 32000


def _ce_chunks(h, w, targets, weights, chunk: int, need_dw: bool):
    """Forward loss sum + d(loss)/dh (+ d(loss)/dW) over token chunks. h [N, D], w [D, V]."""
    n, d = h.shape
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, chunk, d)
    targets = jnp.pad(targets, (0, pad)).reshape(n_chunks, chunk)
    weights = jnp.pad(weights, (0, pad)).reshape(n_chunks, chunk)  # padding weighs 0

    def body(dw_acc, xs):
        h_c, t_c, w_c = xs
        logits = jnp.einsum("cd,dv->cv", h_c, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [c]
        tgt = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        loss = jnp.sum(jnp.where(w_c > 0, (lse - tgt) * w_c, 0.0))
        # d(sum_t w_t * (lse_t - logit_t[y_t])) / d logits = w_t * (softmax_t - onehot(y_t))
        p = jnp.exp(logits - lse[:, None])
        onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
        dlogits = ((p - onehot) * w_c[:, None]).astype(w.dtype)  # [c, V] bf16
        dh = jnp.einsum("cv,dv->cd", dlogits, w, preferred_element_type=jnp.float32)
        if need_dw:
            dw_acc = dw_acc + jnp.einsum(
                "cd,cv->dv", h_c, dlogits, preferred_element_type=jnp.float32
            )
        return dw_acc, (loss, dh.astype(h.dtype))

    dw0 = jnp.zeros(w.shape, jnp.float32) if need_dw else jnp.zeros((), jnp.float32)
    dw, (losses_, dh) = jax.lax.scan(body, dw0, (h, targets, weights))
    return jnp.sum(losses_), dh.reshape(n_chunks * chunk, d)[:n], dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_ce_sum(h, w, targets, weights, chunk):
    loss, _, _ = _ce_chunks(h, w, targets, weights, chunk, need_dw=False)
    return loss


def _fused_fwd(h, w, targets, weights, chunk):
    need_dw = bool(w.perturbed)
    loss, dh, dw = _ce_chunks(h.value, w.value, targets.value, weights.value, chunk, need_dw)
    return loss, (dh, dw if need_dw else None, targets.value, weights.value, w.value)


def _fused_bwd(chunk, res, g):
    dh, dw, targets, weights, w = res
    g = jnp.asarray(g, jnp.float32)
    dh = (dh.astype(jnp.float32) * g).astype(dh.dtype)
    dw = jnp.zeros_like(w) if dw is None else (dw * g).astype(w.dtype)
    t0 = np.zeros(targets.shape, dtype=jax.dtypes.float0)
    return dh, dw, t0, jnp.zeros_like(weights)


fused_ce_sum.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def patch_fused_ce(chunk: int | None = None) -> None:
    from jaxlora import steps
    from jaxlora.losses import target_weights

    def masked_lm_loss(
        hidden, lm_head_kernel, input_ids, loss_mask, segment_ids=None, *, chunk_size=None,
        logit_softcap=None,
    ):  # fmt: skip
        if logit_softcap is not None:
            raise NotImplementedError("fused_ce patch: no logit softcap")
        b, t, d = hidden.shape
        w = target_weights(loss_mask, segment_ids)  # [B, T-1]
        dtype = jnp.promote_types(hidden.dtype, lm_head_kernel.dtype)
        h = hidden[:, :-1].reshape(b * (t - 1), d).astype(dtype)
        targets = input_ids[:, 1:].reshape(-1).astype(jnp.int32)
        loss_sum = fused_ce_sum(
            h, lm_head_kernel.astype(dtype), targets, w.reshape(-1), chunk or FUSED_CHUNK
        )
        return loss_sum, jnp.sum(w)

    steps.masked_lm_loss = masked_lm_loss


# ----------------------------------------------------------------------------- attention


def bias_attention(q, k, v, bias, scale):
    """q [B,T,N,Dh], k/v [B,S,K,Dh], bias [B,1,1,T,S] fp32 additive -> [B,T,N,Dh]."""
    b, t, n, dh = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, dh)  # GQA: G = N / K query heads per KV head
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    s = s * scale + bias  # [B, K, G, T, S] fp32
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.astype(q.dtype).reshape(b, t, n, dh)


def patch_attn_bias() -> None:
    from jaxlora.models import llama

    def dpa(query, key, value, bias=None, mask=None, *, scale=None, **kw):
        if kw.get("implementation") not in (None, "xla") or bias is not None:
            raise NotImplementedError("attn_bias patch: mask-only XLA attention")
        # The boolean mask is [B, 1, T, S], computed once per step outside the layer scan; the
        # additive bias derived from it is loop-invariant too.
        add = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, :, None]  # [B, 1, 1, T, S]
        return bias_attention(query, key, value, add, scale)

    llama.jax = _JaxProxy(dpa)


def block_causal_attention(q, k, v, mask, scale, block: int):
    """Causal attention computed per query block against only the keys it can see.

    q [B,T,N,Dh], k/v [B,T,K,Dh], mask [B,1,T,T] boolean (causal & segment & padding, as
    `llama.attention_mask` builds it). Query block i (rows [i*blk, (i+1)*blk)) only needs keys
    [0, (i+1)*blk): the rest are masked by causality, so skipping them is exact. With n blocks
    the score work is (n+1)/(2n) of the full T x T (56% for n = 8), and each block's fp32
    scores are small enough to stay in cache.
    """
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)  # GQA: [B, T, K, G, Dh]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        s = jnp.einsum(
            "btkgd,bskd->bkgts", qg[:, start:end], k[:, :end], preferred_element_type=jnp.float32
        )  # [B, K, G, blk, end]
        bias = jnp.where(mask[:, :, start:end, :end], 0.0, -1e30)[:, :, None]  # [B,1,1,blk,end]
        p = jax.nn.softmax(s * scale + bias, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bskd->btkgd", p, v[:, :end], preferred_element_type=jnp.float32)
        outs.append(o.astype(q.dtype))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, dh)


def patch_attn_blocks(block: int = 128) -> None:
    """Block-causal attention (see `block_causal_attention`) for T == S (training / prefill);
    the original path otherwise (decode with a KV cache)."""
    from jaxlora.models import llama

    original = jax.nn.dot_product_attention

    def dpa(query, key, value, bias=None, mask=None, *, scale=None, **kw):
        t, s = query.shape[1], key.shape[1]
        if (
            bias is not None
            or mask is None
            or t != s
            or kw.get("implementation")
            not in (
                None,
                "xla",
            )
        ):
            return original(query, key, value, bias=bias, mask=mask, scale=scale, **kw)
        return block_causal_attention(query, key, value, mask, scale, block)

    llama.jax = _JaxProxy(dpa)


def patch_attn_remat() -> None:
    """attn_bias, with the attention core under `jax.checkpoint`: the backward recomputes the
    [B, K, G, T, S] scores/probabilities from q, k, v instead of saving them (fp32 and bf16
    copies stacked over layers by the scan). Costs one extra QK^T + softmax + PV forward."""
    from jaxlora.models import llama

    core = jax.checkpoint(bias_attention, static_argnums=(4,))

    def dpa(query, key, value, bias=None, mask=None, *, scale=None, **kw):
        if kw.get("implementation") not in (None, "xla") or bias is not None:
            raise NotImplementedError("attn_remat patch: mask-only XLA attention")
        add = jnp.where(mask, 0.0, -1e30).astype(jnp.float32)[:, :, None]  # [B, 1, 1, T, S]
        return core(query, key, value, add, scale)

    llama.jax = _JaxProxy(dpa)


def patch_rope_barrier() -> None:
    """RoPE cos/sin [B, T, Dh] computed once per step and kept as buffers: without the barrier
    XLA fuses `cos`/`sin` into every q/k RoPE fusion (forward and backward, every layer when the
    layers are unrolled), recomputing the transcendental for each of the N heads."""
    from jaxlora.models import llama

    original = llama.rope_cos_sin

    def rope_cos_sin(cfg, positions, seq_len):
        return jax.lax.optimization_barrier(original(cfg, positions, seq_len))

    llama.rope_cos_sin = rope_cos_sin


class _JaxProxy:
    """`jax` as seen by models/llama.py with `jax.nn.dot_product_attention` replaced."""

    def __init__(self, dpa):
        self._nn = type("nn", (), {})()
        for name in dir(jax.nn):
            if not name.startswith("__"):
                setattr(self._nn, name, getattr(jax.nn, name))
        self._nn.dot_product_attention = dpa

    @property
    def nn(self):
        return self._nn

    def __getattr__(self, name):
        return getattr(jax, name)


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
            out = llama.jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd**-0.5)
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

    from jaxlora import bench
    from jaxlora.checkpoints import hf

    bench.random_model = with_originals(bench.random_model)
    hf.abstract_params = with_originals(hf.abstract_params)
    llama.Attention, llama.MLP = fused


PATCHES = {
    "head_bf16_grad": patch_head_bf16_grad,
    "fused_ce": patch_fused_ce,
    "attn_bias": patch_attn_bias,
    "fused_proj": patch_fused_proj,
    "attn_remat": patch_attn_remat,
    "rope_barrier": patch_rope_barrier,
    "attn_blocks": patch_attn_blocks,
}


# Everything a patch may replace, so variants can be built one after another in one process.
def _patch_targets() -> list[tuple[object, str]]:
    from jaxlora import bench, losses, steps
    from jaxlora.checkpoints import hf
    from jaxlora.models import llama

    return [
        (losses, "_chunk_logprobs"),
        (steps, "masked_lm_loss"),
        (llama, "jax"),
        (llama, "Attention"),
        (llama, "MLP"),
        (llama, "rope_cos_sin"),
        (bench, "random_model"),
        (hf, "abstract_params"),
    ]


def apply_patches(names: list[str], originals: dict) -> None:
    """Restore every patch target, then apply `names`."""
    for (mod, attr), value in originals.items():
        setattr(mod, attr, value)
    for name in names:
        run_patch(name)


def run_patch(name: str) -> None:
    """Apply one patch; `fused_ce@512` passes an argument (the token chunk)."""
    base, _, arg = name.partition("@")
    if base not in PATCHES:
        raise SystemExit(f"unknown patch {base!r}; choose from {', '.join(PATCHES)}")
    PATCHES[base](*([int(arg)] if arg else []))


def ab_compare(args, specs: list[str]) -> dict:
    """Build every variant's compiled step, then time them interleaved (shuffled per round) so
    a load spike on a shared machine hits all variants alike; report median and min."""
    import random
    import time

    from jaxlora import bench
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
    ap.add_argument("--fused-chunk", type=int, default=256)
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul-peak measurement")
    ap.add_argument(
        "--ab",
        action="append",
        default=[],
        help="interleaved comparison: NAME=PATCHES[|key=value ...], repeatable; the first is the "
        "baseline, e.g. --ab base= --ab fused=fused_ce --ab unroll='|scan_layers=false'",
    )
    args = ap.parse_intermixed_args(argv)
    global FUSED_CHUNK
    FUSED_CHUNK = args.fused_chunk
    if args.ab:
        result = ab_compare(args, args.ab)
        print(json.dumps({"ab": result, "load_avg_1m": __import__("os").getloadavg()[0]}))
        return 0
    names = [p.strip() for p in args.patch.split(",") if p.strip()]
    for name in names:
        run_patch(name)
    from jaxlora import bench
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
