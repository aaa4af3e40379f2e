"""NF4 / int8 quantisation of frozen base weights for QLoRA.

Why this file exists: QLoRA keeps the frozen base model on device in 4 bits (NF4) or 8 bits
(int8) and dequantises each kernel inside the jitted linear layer, so base-weight memory falls
~4x / ~2x against bf16. Everything here is a pure function over arrays and pytrees; no model
import. The same quantiser runs in numpy on the host (`quantize_np`, used by the loader while
streaming safetensors tensor by tensor) and in JAX (`quantize`, usable under jit); both execute
the same code with `xp` = numpy or jax.numpy and give bit-identical results.

A quantised kernel is a plain dict of arrays (no Python scalars or strings as leaves) so jit,
scan, sharding and orbax treat it like any other pytree node. Its kind is told by key names.
Kernels are [..., in, out] (leading axes such as the scanned layer axis L are kept on EVERY leaf,
so `nn.scan` can slice axis 0 of each one), and every leaf is [..., A, B] with A a coarsened
`in` axis and B a coarsened `out` axis, so the kernel's logical axis names apply to each leaf.

NF4 (QLoRA paper, Dettmers et al. 2023; the bitsandbytes NF4 kernel):
    "nf4_codes":     uint8 [..., in/2, out]   two 4-bit codes per byte along `in`, the even
                                              `in` index in the high nibble (bitsandbytes order)
  single quantisation (double_quant=False):
    "absmax":        f32   [..., nb, out]     nb = ceil(in / block_size)
  double quantisation (double_quant=True, the default), bitsandbytes' scheme with int8:
    "absmax_q":      int8  [..., nb, out]     round((absmax - offset) / absmax_scale)
    "absmax_scale":  f32   [..., nb, ceil(out/256)]  step = max|absmax - offset| / 127 per group
                                              of 256 consecutive scales along `out`
    "absmax_offset": f32   [..., 1, 1]        mean of that kernel's absmax (per leading index)
  Blocks are `block_size` consecutive elements along `in` per output column; for in % block == 0
  this is exactly bitsandbytes' flattened blocks of the torch [out, in] weight. Codes are the
  nearest NF4 value to w / absmax, with bitsandbytes' strict `x > midpoint` tie rule and its
  multiply-by-reciprocal normalisation, so codes and absmax match bitsandbytes bit for bit.
  bitsandbytes double-quantises with its dynamic 8-bit map over the flattened scales; we use
  linear int8 over groups along `out` (shardable like the kernel). Storage: 4 + 8/64 + 32/(64*256)
  = 4.127 bits/param (single quantisation: 4.5).
  `in` need not be a multiple of block_size (the last block is partial); `in` itself is read
  from the codes' shape and the block size from ceil(in / block) = nb, which is unambiguous
  because block sizes are powers of two. `in` must be even.

int8 (symmetric absmax per output channel):
    "int8_values":   int8  [..., in, out]     round(w / scale), in [-127, 127]
    "int8_scale":    f32   [..., 1, out]      max|w| over `in` / 127
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError

# The 16 NF4 code values (QLoRA paper appendix E; bitsandbytes' NF4 table), ascending.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision thresholds of bitsandbytes' dQuantizeNF4 (midpoints of adjacent codes, computed in
# float64 and used as float32 literals). code = #{t : x > t}, so exact ties go to the lower code.
NF4_THRESHOLDS = ((NF4_VALUES[:-1].astype(np.float64) + NF4_VALUES[1:]) / 2).astype(np.float32)

DQ_BLOCK = 256  # scales per fp32 step in double quantisation (as bitsandbytes)
NF4_KEY, INT8_KEY = "nf4_codes", "int8_values"
_INV127 = np.float32(1.0 / 127.0)  # multiply, never divide by a constant: XLA may rewrite
# `x / c` as `x * (1 / c)`, which would make the jax and numpy results differ in the last bit.


# ----------------------------------------------------------------------------- helpers


def _check(shape: tuple[int, ...], bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise UserError(f"quantization_bit must be 4 or 8, got {bits!r}")
    if len(shape) < 2:
        raise ValueError(f"can only quantise kernels of shape [..., in, out], got {shape}")
    if bits == 4:
        if block_size < 2 or block_size & (block_size - 1):
            raise UserError(f"NF4 block_size must be a power of two >= 2, got {block_size}")
        if shape[-2] % 2:
            raise UserError(
                f"NF4 packs two codes per byte along the input axis, which must be even; "
                f"got a kernel of shape {tuple(shape)} (in = {shape[-2]})"
            )


def _pad_axis(xp, x, axis: int, size: int):
    """Zero-pad `axis` of x up to `size`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return xp.pad(x, widths)


def _safe_reciprocal(xp, x):
    """1 / x where x > 0, else 0 (an all-zero block quantises to code 0.0, not NaN)."""
    pos = x > 0
    return xp.where(pos, 1.0 / xp.where(pos, x, 1.0), 0.0).astype(np.float32)


def _mean_last2(xp, a):
    """Mean over the last two axes -> [..., 1, 1], by explicit pairwise summation.

    np.mean and jnp.mean sum in different orders; a fixed pairwise tree makes numpy and XLA
    agree bit for bit (each level is an elementwise f32 add of two halves).
    """
    lead = a.shape[:-2]
    n = a.shape[-2] * a.shape[-1]
    x = a.reshape(lead + (n,))
    x = _pad_axis(xp, x, -1, 1 << (n - 1).bit_length())
    while x.shape[-1] > 1:  # log2(n) levels, not a loop over blocks
        x = x[..., 0::2] + x[..., 1::2]
    # Multiply, not divide: XLA rewrites division by a constant into this multiply anyway.
    return _clear_last_bit(xp, x * np.float32(1.0 / n)).reshape(lead + (1, 1))


def _clear_last_bit(xp, x):
    """x with its lowest mantissa bit cleared (a change of at most one ulp).

    Why: under jit, XLA (CPU and GPU) fuses `m = s * (1/n)` with the later `absmax - m` and
    LLVM contracts the pair into one FMA, which skips the rounding of `m` that numpy does, so
    the two backends would disagree in the last bit. An integer op between the multiply and
    the subtraction cannot be contracted or folded away, and it is the same op in numpy.
    """
    if xp is np:
        return (x.view(np.int32) & np.int32(~1)).view(np.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(~1)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _nf4_index(xp, x):
    """Nearest NF4 code index (0..15) of normalised values x in [-1, 1]."""
    if xp is np:  # 15 in-place compare-and-count passes: ~8x faster than np.searchsorted
        idx, above = np.zeros(x.shape, np.uint8), np.empty(x.shape, bool)
        for t in NF4_THRESHOLDS:
            np.greater(x, t, out=above)
            idx += above
        return idx
    # compare_all is a broadcast compare + sum: elementwise, so XLA fuses it.
    return jnp.searchsorted(
        jnp.asarray(NF4_THRESHOLDS), x, side="left", method="compare_all"
    ).astype(jnp.uint8)


def _block_from_shapes(n_in: int, nb: int) -> int:
    """The power-of-two block size b with ceil(n_in / b) == nb (unique for nb >= 2)."""
    if nb == 1:
        return n_in
    return 1 << (math.ceil(n_in / nb) - 1).bit_length()


# ----------------------------------------------------------------------------- quantisers


def _quantize_nf4(xp, w, block_size: int, double_quant: bool) -> dict:
    w = w.astype(np.float32)  # [..., in, out]
    lead, (n_in, n_out) = w.shape[:-2], w.shape[-2:]
    nb = -(-n_in // block_size)
    blocks = _pad_axis(xp, w, -2, nb * block_size).reshape(lead + (nb, block_size, n_out))
    absmax = xp.abs(blocks).max(axis=-2)  # [..., nb, out]
    # bitsandbytes normalises by multiplying with the reciprocal, not by dividing.
    normed = blocks * _safe_reciprocal(xp, absmax)[..., :, None, :]  # [..., nb, block, out]
    normed = normed.reshape(lead + (nb * block_size, n_out))[..., :n_in, :]
    idx = _nf4_index(xp, normed).reshape(lead + (n_in // 2, 2, n_out))
    codes = (idx[..., 0, :] << 4) | idx[..., 1, :]  # [..., in/2, out] uint8
    if not double_quant:
        return {NF4_KEY: codes, "absmax": absmax}
    offset = _mean_last2(xp, absmax)  # [..., 1, 1]
    dev = absmax - offset  # [..., nb, out]
    groups = -(-n_out // DQ_BLOCK)
    dev_g = _pad_axis(xp, dev, -1, groups * DQ_BLOCK).reshape(lead + (nb, groups, DQ_BLOCK))
    step = xp.abs(dev_g).max(axis=-1) * _INV127  # [..., nb, groups]
    q = xp.rint(dev_g * _safe_reciprocal(xp, step)[..., None])
    q = xp.clip(q, -127, 127).astype(np.int8).reshape(lead + (nb, groups * DQ_BLOCK))
    return {
        NF4_KEY: codes,
        "absmax_q": q[..., :n_out],
        "absmax_scale": step,
        "absmax_offset": offset,
    }


def _quantize_int8(xp, w) -> dict:
    w = w.astype(np.float32)  # [..., in, out]
    scale = xp.abs(w).max(axis=-2, keepdims=True) * _INV127  # [..., 1, out]
    q = xp.clip(xp.rint(w * _safe_reciprocal(xp, scale)), -127, 127).astype(np.int8)
    return {INT8_KEY: q, "int8_scale": scale}


def _quantize(xp, w, bits: int, block_size: int, double_quant: bool) -> dict:
    _check(tuple(w.shape), bits, block_size)
    if bits == 4:
        return _quantize_nf4(xp, w, block_size, double_quant)
    return _quantize_int8(xp, w)


# One compiled program per (shape, settings) instead of ~60 dispatched ops when called eagerly;
# inside an outer jit it is simply inlined.
_quantize_jax = jax.jit(functools.partial(_quantize, jnp), static_argnums=(1, 2, 3))


def quantize(w: jax.Array, bits: int, *, block_size: int = 64, double_quant: bool = True) -> dict:
    """Quantise a kernel [..., in, out] to NF4 (bits=4) or int8 (bits=8), in JAX (jit-able)."""
    w = jnp.asarray(w)
    _check(tuple(w.shape), bits, block_size)  # raise before tracing
    return _quantize_jax(w, bits, block_size, double_quant)


def quantize_nf4(w: jax.Array, block_size: int = 64, double_quant: bool = True) -> dict:
    """NF4-quantise a kernel [..., in, out] (see module docstring for the dict layout)."""
    return quantize(w, 4, block_size=block_size, double_quant=double_quant)


def quantize_int8(w: jax.Array) -> dict:
    """Symmetric per-output-channel int8 quantisation of a kernel [..., in, out]."""
    return quantize(w, 8)


def quantize_np(
    w: np.ndarray, bits: int, *, block_size: int = 64, double_quant: bool = True
) -> dict:
    """Host-side numpy twin of `quantize` (bit-identical), for quantising while loading."""
    return _quantize(np, np.asarray(w), bits, block_size, double_quant)


def abstract_quantized(
    shape: tuple[int, ...],
    dtype: Any = jnp.bfloat16,
    bits: int = 4,
    *,
    block_size: int = 64,
    double_quant: bool = True,
) -> dict:
    """ShapeDtypeStruct tree of what `quantize` returns for a [..., in, out] `dtype` kernel."""
    return jax.eval_shape(
        lambda w: quantize(w, bits, block_size=block_size, double_quant=double_quant),
        jax.ShapeDtypeStruct(tuple(shape), dtype),
    )


# ----------------------------------------------------------------------------- dequantisation


def quant_kind(x: Any) -> str | None:
    """'nf4', 'int8' or None (not a quantised kernel)."""
    if isinstance(x, Mapping):
        if NF4_KEY in x:
            return "nf4"
        if INT8_KEY in x:
            return "int8"
    return None


def is_quantized(x: Any) -> bool:
    """True for a dict produced by `quantize` / `quantize_np` (recognised by its keys)."""
    return quant_kind(x) is not None


def nf4_absmax(q: Mapping) -> jax.Array:
    """The per-block absmax [..., nb, out] f32 of an NF4 dict, undoing double quantisation."""
    if "absmax" in q:
        return jnp.asarray(q["absmax"], jnp.float32)
    aq = jnp.asarray(q["absmax_q"])  # [..., nb, out]
    step = jnp.asarray(q["absmax_scale"])  # [..., nb, groups]
    groups, n_out = step.shape[-1], aq.shape[-1]
    step = jnp.broadcast_to(step[..., None], step.shape + (DQ_BLOCK,))
    step = step.reshape(step.shape[:-2] + (groups * DQ_BLOCK,))[..., :n_out]
    return aq.astype(jnp.float32) * step + jnp.asarray(q["absmax_offset"], jnp.float32)


def _dequantize_nf4(q: Mapping) -> jax.Array:
    codes = jnp.asarray(q[NF4_KEY])  # [..., in/2, out]
    lead, n_out = codes.shape[:-2], codes.shape[-1]
    n_in = 2 * codes.shape[-2]
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-2).reshape(lead + (n_in, n_out))
    vals = jnp.asarray(NF4_VALUES)[idx]  # [..., in, out] table gather
    absmax = nf4_absmax(q)  # [..., nb, out]
    nb = absmax.shape[-2]
    block = _block_from_shapes(n_in, nb)
    absmax = jnp.broadcast_to(absmax[..., :, None, :], lead + (nb, block, n_out))
    return vals * absmax.reshape(lead + (nb * block, n_out))[..., :n_in, :]


@functools.partial(jax.jit, static_argnums=1)
def _dequantize_jax(kernel: Mapping, dtype: Any) -> jax.Array:
    if INT8_KEY in kernel:
        vals = kernel[INT8_KEY].astype(jnp.float32)  # [..., in, out]
        return (vals * kernel["int8_scale"].astype(jnp.float32)).astype(dtype)
    return _dequantize_nf4(kernel).astype(dtype)


def dequantize(kernel: Any, dtype: Any = jnp.bfloat16) -> jax.Array:
    """The [..., in, out] kernel in `dtype`: a cast for a plain array, else dequantised.

    The gather, the multiply by the scale and the cast are elementwise, so under jit XLA fuses
    them into one loop reading the packed codes and writing `dtype`. The arithmetic is done in
    f32 and rounded once (as bitsandbytes' kernel does); no f32 copy of the weight is stored.
    """
    if not is_quantized(kernel):
        return kernel.astype(dtype)
    return _dequantize_jax(dict(kernel), jnp.dtype(dtype))


# ----------------------------------------------------------------------------- trees


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


# Norms have "scale" leaves, never "kernel". "gate" is an MoE router ([D, E], tiny): kept in the
# base dtype, as bitsandbytes QLoRA leaves transformers 5's router modules (not nn.Linear) alone.
_NEVER = ("embed_tokens", "embedding", "lm_head", "gate")


def default_predicate(path: tuple[str, ...]) -> bool:
    """Projection kernels only: leaf named 'kernel', not under embeddings, norms or lm_head."""
    return bool(path) and path[-1] == "kernel" and not any(p in _NEVER for p in path)


def quantize_tree(
    params: Any,
    bits: int,
    predicate: Callable[[tuple[str, ...]], bool] | None = None,
    *,
    block_size: int = 64,
    double_quant: bool = True,
) -> Any:
    """Quantise the kernel leaves selected by `predicate(path)` (path = tuple of key names).

    jax arrays go through `quantize`, numpy arrays through `quantize_np` and ShapeDtypeStructs
    through `abstract_quantized` (for abstract restore / sharding). Already-quantised dicts and
    unselected leaves are returned unchanged.
    """
    pred = default_predicate if predicate is None else predicate

    def one(path, leaf):
        if is_quantized(leaf):
            return leaf
        names = tuple(_key_name(k) for k in path)
        if not pred(names):
            return leaf
        kw = dict(block_size=block_size, double_quant=double_quant)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return abstract_quantized(leaf.shape, leaf.dtype, bits, **kw)
        if isinstance(leaf, np.ndarray):
            return quantize_np(leaf, bits, **kw)
        return quantize(leaf, bits, **kw)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def nbytes(tree: Any) -> int:
    """Real storage of a pytree's array leaves in bytes (packed NF4 codes: 1 byte per 2 params).

    Works for jax/numpy arrays and ShapeDtypeStructs alike.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shape, dtype = np.shape(leaf), getattr(leaf, "dtype", None)
        dtype = np.asarray(leaf).dtype if dtype is None else dtype
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total
