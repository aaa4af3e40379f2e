"""Library flash-attention kernels for accelerators, behind one calling convention.

Why this file exists: the dense XLA path (`jax.nn.dot_product_attention` with no
`implementation`) materialises fp32 [B, N, T, T] scores per layer. The kernels here never do;
each is a thin adapter from the model's layout (q [B, T, N, Dh], k/v [B, T, K, Dh], packed
`segment_ids` [B, T] with 0 = padding) to a kernel that JAX itself ships:

  * `splash`  TPU Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
              causal or local (sliding window) mask, segment ids, GQA natively (MHA kernel with
              fewer K/V heads), fused backward kernel, attention logit soft-cap (Gemma 2).
  * `pallas`  GPU Pallas/Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`):
              causal + segment ids, custom backward kernels; GQA by repeating K/V heads (the
              gradient of the repeat sums back per K/V head); no sliding window.
  * `cudnn`   cuDNN flash attention via `jax.nn.dot_product_attention(implementation="cudnn")`:
              `is_causal` (upper blocks skipped), the packing mask passed as a boolean [B,1,T,T]
              mask (cuDNN adds it as a bias), `local_window_size` for sliding windows. bf16/fp16
              only.

Padding semantics shared by all three: a padding query (segment 0) attends to earlier padding
keys, never to a real token, and no real query attends to padding; so outputs at real positions
and all gradients reaching real tokens equal the dense reference exactly (the dense path masks
pad keys for everyone, and its pad-row outputs are never used either).

`interpret=True` runs the Pallas kernels in the Pallas interpreter: any backend (CPU tests),
same numerics, slow. cuDNN has no interpreter.

Constraints (checked by `jaxlora.models.attention.select`, which falls back with a reason):
splash needs T % 128 == 0 (the TPU lane width); pallas needs T % 16 == 0 and no window;
cudnn needs bf16/fp16, head_dim % 8 == 0 and <= 256, even T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SPLASH_LANES = 128  # TPU lane width: splash blocks (and so T) are multiples of it


def _splash_block(t: int) -> int:
    """Largest of 512 / 256 / 128 dividing T (MaxText runs 512-2048 on v5e/v6e)."""
    return next(b for b in (512, 256, SPLASH_LANES) if t % b == 0)


def _splash_kernel(
    t: int, heads: int, window: int | None, interpret: bool, softcap: float | None = None
):
    """The splash kernel for (T, heads, window); the mask's block tables are built with numpy
    at trace time. Not cached across traces: the kernel object holds arrays that would leak
    from one trace into another (UnexpectedTracerError under nn.scan + grad)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        head_mask = sa.CausalMask((t, t))
    else:
        # q - k < window  <=>  k >= q - (window - 1); right side 0 = causal.
        head_mask = sa.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    block = _splash_block(t)
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        use_fused_bwd_kernel=True,
    )
    return sa.make_splash_mha(
        mask=sa.MultiHeadMask([head_mask] * heads),
        block_sizes=sizes,
        # Gemma 2: logits -> c * tanh(logits / c), in the forward and both backward kernels.
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash(q, k, v, segment_ids, scale: float, window: int | None, interpret: bool, softcap=None):
    """TPU splash attention; q [B,T,N,Dh], k/v [B,T,K,Dh], segment_ids [B,T] -> [B,T,N,Dh].

    `softcap` (Gemma 2): the kernel caps the logits it sees, which are already scaled (q is
    multiplied by `scale` first), so it computes c * tanh(scale * q.k / c) as the model does."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    t, n = q.shape[1], q.shape[2]
    kernel = _splash_kernel(t, n, window, interpret, softcap)
    # The kernel takes heads first, one example at a time, and does not scale the logits.
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [B, N, T, Dh]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, T, Dh]
    seg = segment_ids.astype(jnp.int32)

    def one(qb, kb, vb, sb):
        return kernel(qb, kb, vb, segment_ids=sa.SegmentIds(q=sb, kv=sb))

    out = jax.vmap(one)(qh, kh, vh, seg)  # [B, N, T, Dh]
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def pallas_gpu(q, k, v, segment_ids, scale: float, interpret: bool):
    """GPU Pallas (Triton) flash attention, causal with segment ids; GQA by repeated K/V heads."""
    import warnings

    with warnings.catch_warnings():
        # JAX 0.12 marks this module deprecated in favour of tokamax (see README "Attention").
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k = jnp.repeat(k, groups, axis=2)  # [B, T, N, Dh]
        v = jnp.repeat(v, groups, axis=2)
    t = q.shape[1]
    block = min(128, t)
    bwd = min(32, t)
    sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=bwd,
        block_kv_dkv=bwd,
        block_q_dq=bwd,
        block_kv_dq=bwd,
    )
    return gpu_attention.mha(
        q,
        k,
        v,
        segment_ids.astype(jnp.int32),
        sm_scale=scale,
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )


def cudnn(q, k, v, segment_ids, scale: float, window: int | None, right_padded: bool):
    """cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`), causal.

    `right_padded` (each row is ONE sample followed by padding: unpacked training batches):
    the padding goes in as per-row sequence lengths, cuDNN's native PADDING_CAUSAL mask; no
    [B, 1, T, T] array is built. (With causality a real query never reaches a key after its
    sample anyway; the lengths let cuDNN skip the padding's work.) A row of padding only (a dummy
    row) gets length 1, not 0: its first token attends to itself, so no softmax is empty; its
    outputs are never used.

    Otherwise (packed rows, left padding): JAX's cuDNN API has no segment ids, so the
    same-segment test goes in as a boolean [B, 1, T, T] mask, which JAX turns into an additive
    bf16/fp16 bias that the kernel reads block by block (no skipping of cross-segment blocks),
    and in JAX < 0.11.1 the backward also computes that bias's gradient (jax-ml/jax#34685).
    cuDNN's own packed layout (`q_offsets`/`kv_offsets`) is only reachable through JAX's
    private `jax._src.cudnn` module, Hopper-only, and its GQA offsets were wrong before
    jax-ml/jax#39521 (JAX 0.11.1); it is not used. `auto` picks this branch on JAX >= 0.11.1
    while the bias stays small (models/attention.py `CUDNN_BIAS_BYTES`): on an H200 it was
    checked against fp32 dense (packed rows with padding, GQA 32/8, T = 2048: out and q/k/v
    grads within the dense bf16 error) and ran fwd + bwd in 2.51 ms vs Pallas 3.43 ms.
    """
    local = None if window is None else (window - 1, 0)
    if right_padded:
        lengths = jnp.maximum(jnp.sum(segment_ids != 0, axis=1), 1).astype(jnp.int32)  # [B]
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=True,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            local_window_size=local,
            implementation="cudnn",
        )
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=same[:, None],  # [B, 1, T, T]
        scale=scale,
        is_causal=True,
        local_window_size=local,
        implementation="cudnn",
    )
