"""Attention for every mode: which kernel runs (`attention:`), and the CPU block-causal kernel.

Why this file exists: the model has one attention call (`Attention` in `models/llama.py`); this
module decides, once per traced shape, which kernel serves it and says so in one log line:

  kernel   where         what                                                     file
  xla      anywhere      dense `jax.nn.dot_product_attention` (the reference)     here
  block    CPU           block-causal, recomputing backward (below)               here
  splash   TPU           Pallas splash attention, segment ids, GQA, window        models/flash.py
  pallas   GPU           Pallas/Triton flash attention, segment ids               models/flash.py
  cudnn    GPU           cuDNN flash via jax.nn.dot_product_attention(cudnn)      models/flash.py

`auto` picks per platform: TPU -> splash; GPU -> cudnn for bf16/fp16 (rows that are one sample
then padding, `AttentionSpec.right_padded`, go in as sequence lengths; packed rows and
left-padded prompts as a [B, 1, T, T] same-segment mask bias, see flash.cudnn), else pallas
(fp32; a sliding window is cuDNN-only). The packed cuDNN path needs JAX >= 0.11.1 (older JAX also
differentiates the bias) and a per-device bias of at most `CUDNN_BIAS_BYTES`; otherwise packed
rows go to pallas (segment ids natively, no T x T array). Measured on an H200 (JAX 0.11.2,
Llama-3-8B heads, T = 2048 packed, fwd + bwd): cudnn-packed 2.51 ms, pallas 3.43 ms, dense
6.55 ms, all within bf16 error of fp32; LoRA r16 8B-shape step at T = 4096: 12.0k tok/s with
cudnn vs 10.7k with pallas (benchmarks/RESULTS.md).
CPU -> block for T >= 256 (dense is as fast below). A kernel that cannot serve a case (fp32 on
cuDNN, a sliding window on the Pallas GPU kernel, T not a multiple of 128 for splash, ...) falls
back to the next candidate (block on CPU, else xla) and the log line gives the reason. An
attention logit soft-cap (Gemma 2: `c * tanh(scores / c)`) runs on the xla path (`_softcapped`),
in the block kernel (its backward multiplies dS by 1 - (S / c)^2) and in splash (the kernel's own
`attn_logits_soft_cap`); the GPU kernels (cuDNN, Pallas) have none and fall back, announced.
Decode steps
with a KV cache always run dense (one query row: nothing to tile). `interpret=True` runs the
Pallas kernels in the Pallas interpreter on any backend (CPU tests); `platform` overrides the
backend the choice is made for (lowering a TPU/GPU step on a CPU host).

On a multi-device mesh (`jax.set_mesh`, as the trainer does) the accelerator kernels run under
`jax.shard_map`, each device on its own batch rows and heads (`kernel_partition`): XLA cannot
partition a Pallas custom call and would otherwise gather q/k/v to full size on every device.

The CPU block kernel: on XLA:CPU the dense path computes all T x T scores of every head, and
autodiff inside the scanned layers saves the fp32 probabilities of every layer ([L, B, N, T, T]).
Here

  * query block [s, e) attends only to keys [0, e): the keys after it are masked by causality
    anyway, so skipping them is exact and the score work drops to (n+1)/(2n) of T x T;
  * the forward keeps only the output and the per-row log-sum-exp; the backward recomputes each
    block's probabilities from them (one extra Q K^T per block) instead of saving them.

The math, per query block (GQA: G query heads share one KV head):

    S = scale * Q K^T + bias,  P = exp(S - lse),  O = P V
    dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale * dS K,  dK = scale * dS^T Q,
    dV = P^T dO
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlora.models import flash

log = logging.getLogger("jaxlora.attention")

KERNELS = ("auto", "xla", "cudnn", "pallas", "splash", "block")
# Query rows per block. 128 keeps a block's fp32 scores ([B, N, 128, <= T]) cache-sized.
ATTENTION_BLOCK = 128
_NEG = -1e30  # additive bias of a masked key (finite: a fully masked row stays finite)
_PLATFORM_KERNELS = {"tpu": ("splash",), "gpu": ("cudnn", "pallas"), "cpu": ("block",)}
_KERNEL_PLATFORM = {"splash": "tpu", "cudnn": "gpu", "pallas": "gpu", "block": "cpu"}
_announced: set[tuple] = set()
# Packed rows on cuDNN: the same-segment mask becomes a bf16 [B, 1, T, T] bias on every device.
# Beyond 1 GiB per device (e.g. B = 8 rows at T = 8192) the Pallas kernel's O(T) segment ids win.
CUDNN_BIAS_BYTES = 1 << 30
# JAX < 0.11.1 also computes the gradient of that bias in the backward (jax-ml/jax#34685).
CUDNN_PACKED_JAX = (0, 11, 1)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The `attention` / `attention_interpret` settings as the model sees them (hashable)."""

    kernel: str = "auto"
    interpret: bool = False  # Pallas kernels in the interpreter (any backend; slow)
    platform: str | None = None  # None = jax.default_backend(); "tpu"/"gpu" when lowering
    # Every row is ONE sample then padding (unpacked training batches; set by the trainer when
    # packing is off). Only then may `auto` pick cuDNN: it takes that padding as sequence
    # lengths. Packed rows and left-padded prompts (generation) keep it False.
    right_padded: bool = False
    # Shape-only traces (parameter init on a dummy row) log no kernel line.
    quiet: bool = False


DEFAULT_ATTENTION = AttentionSpec()


def _platform(spec: AttentionSpec) -> str:
    p = (spec.platform or jax.default_backend()).lower()
    return {"cuda": "gpu", "rocm": "gpu"}.get(p, p)


def _unsupported(kernel, platform, spec, t, dtype, head_dim, window, softcap=None) -> str | None:
    """Why `kernel` cannot run this case, or None when it can."""
    if kernel == "xla":
        return None
    if kernel == "block":
        return None  # plain XLA ops: runs anywhere (tuned for, and auto-picked on, CPU)
    if softcap is not None and kernel != "splash":
        return f"the {kernel} kernel has no attention logit soft-cap"
    if platform != _KERNEL_PLATFORM[kernel] and not (kernel != "cudnn" and spec.interpret):
        return f"{kernel} needs a {_KERNEL_PLATFORM[kernel].upper()} (platform {platform})"
    if kernel == "splash" and t % flash.SPLASH_LANES:
        return f"splash needs T % {flash.SPLASH_LANES} == 0 (T = {t})"
    if kernel == "pallas":
        if window is not None:
            return "the Pallas GPU kernel has no sliding window"
        if t % 16:
            return f"the Pallas GPU kernel needs T % 16 == 0 (T = {t})"
    if kernel == "cudnn":
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention is bf16/fp16 only (compute dtype {jnp.dtype(dtype)})"
        if head_dim % 8 or head_dim > 256:
            return f"cuDNN flash attention needs head_dim % 8 == 0 and <= 256 ({head_dim})"
        if t % 2:
            return f"cuDNN flash attention with a mask needs an even T (T = {t})"
    return None


def select(
    spec: AttentionSpec,
    t: int,
    dtype,
    head_dim: int,
    window: int | None,
    softcap: float | None = None,
    batch: int = 1,
):
    """(kernel, reason): the kernel serving an uncached T x T call, and why (for the log).

    `batch`: rows per device (sizes the cuDNN mask bias of packed rows)."""
    platform = _platform(spec)
    if spec.kernel == "auto":
        wanted = _PLATFORM_KERNELS.get(platform, ())
        if platform == "cpu" and t < 2 * ATTENTION_BLOCK:
            return "xla", f"auto on cpu: T = {t} < {2 * ATTENTION_BLOCK}, dense is as fast"
    else:
        wanted = (spec.kernel,)
    reasons = []
    if spec.kernel == "auto" and platform == "gpu" and not spec.right_padded:
        # cuDNN through JAX has no segment ids: packed rows go in as a [B, 1, T, T] additive
        # bias (flash.cudnn). Faster than the Pallas kernel where it fits (module docstring).
        bias = batch * t * t * 2
        if jax.__version_info__ < CUDNN_PACKED_JAX:
            wanted = tuple(x for x in wanted if x != "cudnn")
            reasons.append(
                f"cuDNN takes packed rows only on JAX >= 0.11.1 (this is {jax.__version__})"
            )
        elif bias > CUDNN_BIAS_BYTES:
            wanted = tuple(x for x in wanted if x != "cudnn")
            reasons.append(
                f"cuDNN's packed-row mask bias would take {bias / 2**30:.1f} GiB per device"
            )
    for kernel in wanted:
        why = _unsupported(kernel, platform, spec, t, dtype, head_dim, window, softcap)
        if why is None:
            if kernel == "cudnn" and not spec.right_padded:
                reasons.append("segment ids as a [B, 1, T, T] mask bias")
            return kernel, "; ".join([f"{spec.kernel} on {platform}", *reasons])
        reasons.append(why)
    fallback = "block" if platform == "cpu" and t >= 2 * ATTENTION_BLOCK else "xla"
    if not reasons:
        return fallback, f"auto on {platform}: no flash kernel for this platform"
    return fallback, "fallback: " + "; ".join(reasons)


def _announce(spec: AttentionSpec, kernel: str, reason: str, shape: tuple) -> None:
    key = (spec, kernel, reason)
    if key not in _announced and not spec.quiet:
        _announced.add(key)
        level = logging.WARNING if reason.startswith("fallback") else logging.INFO
        log.log(level, "attention: %s kernel for q %s (%s)", kernel, shape, reason)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    window: int | None = None,
    spec: AttentionSpec = DEFAULT_ATTENTION,
    softcap: float | None = None,
) -> jax.Array:
    """q [B,T,N,Dh], k/v [B,S,K,Dh] -> [B,T,N,Dh] in q's dtype.

    Self-attention over a fresh sequence passes `segment_ids` [B, T] (0 = padding; packed
    samples never see each other), causal with the optional sliding `window`. A call with an
    explicit boolean `mask` [B, 1, T, S] instead (decode over a KV cache) runs dense.
    `softcap`: scores become `softcap * tanh(scores / softcap)` before the mask (dense only).
    """
    if mask is not None or segment_ids is None:
        if softcap is not None:
            return _softcapped(q, k, v, mask, scale, softcap)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    t = q.shape[1]
    part = kernel_partition(q.shape[0], q.shape[2], k.shape[2])
    local_batch = q.shape[0] // _batch_shards(part)
    kernel, reason = select(spec, t, q.dtype, q.shape[-1], window, softcap, local_batch)
    if kernel in ("splash", "pallas", "cudnn"):
        if part is None and kernel != "cudnn" and not spec.interpret and jax.device_count() > 1:
            # Inference outside the trainer's mesh context (generation, chat, scoring) on a
            # multi-device host: the arrays may be sharded, and a Pallas call cannot be
            # partitioned (Mosaic refuses to lower). Dense is correct whatever the layout.
            # (cuDNN's JAX primitive carries its own partitioning rule.)
            reason = (
                f"fallback: the {kernel} kernel outside a mesh context on "
                f"{jax.device_count()} devices (XLA cannot partition a kernel call)"
            )
            kernel = "xla"
        else:
            return _run_kernel(
                kernel, part, q, k, v, segment_ids, scale, window, spec, reason, softcap
            )
    _announce(spec, kernel, reason, q.shape)
    dense_mask = causal_mask(segment_ids, window)
    if kernel == "block":
        return block_causal_attention(q, k, v, dense_mask, scale, ATTENTION_BLOCK, softcap)
    if softcap is not None:
        return _softcapped(q, k, v, dense_mask, scale, softcap)
    return jax.nn.dot_product_attention(q, k, v, mask=dense_mask, scale=scale)


def _run_kernel(kernel, part, q, k, v, segment_ids, scale, window, spec, reason, softcap=None):
    """The accelerator kernel on the global arrays (`part` None: one device) or per device."""
    fn = {
        "splash": lambda q, k, v, s: flash.splash(
            q, k, v, s, scale, window, spec.interpret, softcap
        ),
        "pallas": lambda q, k, v, s: flash.pallas_gpu(q, k, v, s, scale, spec.interpret),
        "cudnn": lambda q, k, v, s: flash.cudnn(q, k, v, s, scale, window, spec.right_padded),
    }[kernel]
    if part is None:
        _announce(spec, kernel, reason, q.shape)
        return fn(q, k, v, segment_ids)
    mesh, qkv, seg = part
    _announce(spec, kernel, f"{reason}; per device via shard_map, q/k/v {qkv}", q.shape)
    # check_vma=False: JAX's Pallas kernels declare no varying-mesh-axes types for their
    # outputs (pallas_call refuses under check_vma=True). Gradients stay exact: every mesh
    # axis the specs leave out only replicates work (tests/test_flash_sharded.py).
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv, check_vma=False
    )(q, k, v, segment_ids)


def _batch_shards(part) -> int:
    """How many devices split the batch under `kernel_partition`'s specs (1 without a mesh)."""
    if part is None or part[2][0] is None:
        return 1
    mesh, names = part[0], part[2][0]
    names = (names,) if isinstance(names, str) else names
    return math.prod(dict(mesh.shape)[a] for a in names)


def kernel_partition(batch: int, heads: int, kv_heads: int):
    """(mesh, q/k/v spec, segment-ids spec) to run a kernel per device, or None (no mesh).

    A Pallas kernel (splash, the GPU kernel) is one custom call on whatever shape it is given:
    XLA cannot split it, so inside the partitioned train step its inputs would be gathered to
    full size on every device. Run under `jax.shard_map` instead, each device calls the kernel
    on its own rows and heads. The split follows the flax logical rules in context (those of
    `parallel.sharding`: "batch" -> the batch mesh axes, "q_heads" -> "tensor"), so the kernel
    sees q/k/v already laid out as the projections made them. A mesh axis is used only where
    the size divides (batch: trailing axes dropped until it does, as `parallel.sharding`
    does); heads are split only when both N and K divide (query-head block j then uses exactly
    kv-head block j, so GQA stays local). When nothing divides, the specs are all None: every
    device runs the whole kernel on gathered inputs (correct, and still lowerable: a kernel call
    outside a shard_map on a multi-device mesh is not). None without a multi-device mesh
    (`jax.set_mesh`).
    """
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or mesh.empty or mesh.size == 1:
        return None
    logical = nn.logical_to_mesh_axes(("batch", None, "q_heads", None))
    if logical is None:
        return None
    sizes = dict(mesh.shape)

    def axes(entry) -> tuple[str, ...]:
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return tuple(a for a in names if a in sizes)

    b_axes = axes(logical[0])
    while b_axes and batch % math.prod(sizes[a] for a in b_axes):
        b_axes = b_axes[:-1]
    h_axes = tuple(a for a in axes(logical[2]) if a not in b_axes)
    if h_axes and (
        heads % math.prod(sizes[a] for a in h_axes)
        or kv_heads % math.prod(sizes[a] for a in h_axes)
    ):
        h_axes = ()
    b = None if not b_axes else b_axes[0] if len(b_axes) == 1 else b_axes
    h = None if not h_axes else h_axes[0] if len(h_axes) == 1 else h_axes
    return mesh, P(b, None, h, None), P(b, None)


def causal_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, T]: causal, same segment, key not padding (segment 0), within window."""
    t = segment_ids.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    causal = k_idx <= q_idx
    if sliding_window is not None:
        causal = causal & (q_idx - k_idx < sliding_window)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    valid = (segment_ids != 0)[:, None, :]
    return (causal[None] & same & valid)[:, None]


def _softcapped(q, k, v, mask, scale, softcap):
    """Dense attention with soft-capped scores (as transformers' Gemma 2 eager attention):
    S = c * tanh(scale * Q K^T / c), masked, softmax in fp32. q [B,T,N,Dh], k/v [B,S,K,Dh]."""
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)  # [B, T, K, G, Dh]
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    s = softcap * jnp.tanh(s / softcap)
    if mask is not None:  # [B, 1, T, S] -> [B, 1, 1, T, S]
        s = jnp.where(mask[:, :, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, dh).astype(q.dtype)


def _blocks(t: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def _scores(qb, k, mask_b, scale, softcap=None):
    """fp32 [B, K, G, blk, e] masked scores of query block qb [B, blk, K, G, Dh] vs k[:, :e]
    (soft-capped, c * tanh(s / c), when `softcap` is set)."""
    s = jnp.einsum("btkgd,bskd->bkgts", qb, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    return jnp.where(mask_b[:, :, None], s, _NEG)  # mask_b [B, 1, blk, e] -> [B, 1, 1, blk, e]


def _forward(q, k, v, mask, scale, block, softcap=None):
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)  # [B, T, K, G, Dh]
    outs, lses = [], []
    for start, end in _blocks(t, block):
        s = _scores(qg[:, start:end], k[:, :end], mask[:, :, start:end, :end], scale, softcap)
        m = jnp.max(s, axis=-1, keepdims=True)  # [B, K, G, blk, 1]
        p = jnp.exp(s - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum(
            "bkgts,bskd->btkgd", p.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32
        )  # [B, blk, K, G, Dh], not yet normalised
        outs.append((o / jnp.moveaxis(denom, 3, 1)).astype(q.dtype))
        lses.append((m + jnp.log(denom))[..., 0])  # [B, K, G, blk]
    out = jnp.concatenate(outs, axis=1)  # [B, T, K, G, Dh]
    return out, jnp.concatenate(lses, axis=-1)  # lse [B, K, G, T] fp32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def block_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    block: int,
    softcap: float | None = None,
) -> jax.Array:
    """Exact causal attention by query blocks; see the module docstring."""
    out, _ = _forward(q, k, v, mask, scale, block, softcap)
    return out.reshape(q.shape)


def _fwd(q, k, v, mask, scale, block, softcap=None):
    out, lse = _forward(q, k, v, mask, scale, block, softcap)
    return out.reshape(q.shape), (q, k, v, mask, out, lse)


def _bwd(scale, block, softcap, res, d_out):
    q, k, v, mask, out, lse = res
    b, t, n, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, dh)
    dog = d_out.reshape(qg.shape).astype(q.dtype)  # [B, T, K, G, Dh]
    # rowsum(dO * O) per query row: [B, K, G, T] fp32.
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog.astype(jnp.float32), out.astype(jnp.float32))
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for start, end in _blocks(t, block):
        qb, dob = qg[:, start:end], dog[:, start:end]
        s = _scores(qb, k[:, :end], mask[:, :, start:end, :end], scale, softcap)
        p = jnp.exp(s - lse[..., start:end, None])  # [B, K, G, blk, e]; 0 where masked
        dp = jnp.einsum("btkgd,bskd->bkgts", dob, v[:, :end], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., start:end, None]) * scale
        if softcap is not None:  # through c * tanh(x / c); masked scores (-1e30) get no gradient
            keep = mask[:, :, None, start:end, :end]  # [B, 1, 1, blk, e]
            ds = ds * jnp.where(keep, 1.0 - jnp.square(s / softcap), 0.0)
        ds = ds.astype(q.dtype)
        dq_blocks.append(
            jnp.einsum("bkgts,bskd->btkgd", ds, k[:, :end], preferred_element_type=jnp.float32)
        )
        dk = dk.at[:, :end].add(
            jnp.einsum("bkgts,btkgd->bskd", ds, qb, preferred_element_type=jnp.float32)
        )
        dv = dv.at[:, :end].add(
            jnp.einsum(
                "bkgts,btkgd->bskd", p.astype(v.dtype), dob, preferred_element_type=jnp.float32
            )
        )
    dq = jnp.concatenate(dq_blocks, axis=1).reshape(q.shape).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


block_causal_attention.defvjp(_fwd, _bwd)
