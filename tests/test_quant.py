"""Tests for jaxlora.models.quant: NF4 / int8 frozen-weight quantisation (QLoRA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.models import quant as Q

# QLoRA paper (Dettmers et al. 2023), appendix E / bitsandbytes' NF4 table.
PAPER_NF4 = [
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
]
MAX_HALF_GAP = float(np.max(np.diff(np.asarray(PAPER_NF4, np.float64))) / 2)  # 0.1385


def _f(v: float) -> np.float32:
    return np.float32(v)


def bnb_dquantize_nf4(x: np.ndarray) -> np.ndarray:
    """Vectorised transcription of bitsandbytes csrc/kernels.cu `dQuantizeNF4` (decision tree)."""
    w = np.where
    return w(
        x > _f(0.03979014977812767),
        w(
            x > _f(0.3893125355243683),
            w(
                x > _f(0.6427869200706482),
                w(x > _f(0.8614784181118011), 15, 14),
                w(x > _f(0.5016634166240692), 13, 12),
            ),
            w(
                x > _f(0.2035212516784668),
                w(x > _f(0.2920137718319893), 11, 10),
                w(x > _f(0.1202552504837513), 9, 8),
            ),
        ),
        w(
            x > _f(-0.33967943489551544),
            w(
                x > _f(-0.13791173323988914),
                w(x > _f(-0.045525018125772476), 7, 6),
                w(x > _f(-0.23460740596055984), 5, 4),
            ),
            w(
                x > _f(-0.6106329262256622),
                w(x > _f(-0.4599952697753906), 3, 2),
                w(x > _f(-0.8480964004993439), 1, 0),
            ),
        ),
    ).astype(np.uint8)


def bnb_quantize_4bit(w_torch: np.ndarray, block: int = 64):
    """bitsandbytes quantize_4bit(quant_type='nf4', compress_statistics=False) on a torch
    [out, in] weight: flatten, blocks of `block` consecutive elements, absmax, multiply by the
    reciprocal, decision tree, pack pairs high-nibble first. Returns (packed, absmax, deq)."""
    blocks = w_torch.astype(np.float32).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)  # [n_blocks]
    normed = blocks * (np.float32(1.0) / absmax)[:, None]
    codes = bnb_dquantize_nf4(normed).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    deq = np.asarray(PAPER_NF4, np.float32)[codes].reshape(-1, block) * absmax[:, None]
    return packed, absmax, deq.reshape(w_torch.shape)


def _normal(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rel_fro(w, d) -> float:
    w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
    return float(np.linalg.norm(w - d) / np.linalg.norm(w))


def _per_element_absmax(w: np.ndarray, block: int) -> np.ndarray:
    """absmax of each element's block (blocks along the in axis, last block partial)."""
    n_in = w.shape[-2]
    nb = -(-n_in // block)
    pad = np.zeros(w.shape[:-2] + (nb * block - n_in, w.shape[-1]), w.dtype)
    wp = np.concatenate([w, pad], axis=-2).reshape(w.shape[:-2] + (nb, block, w.shape[-1]))
    a = np.abs(wp).max(axis=-2, keepdims=True)
    return np.broadcast_to(a, wp.shape).reshape(w.shape[:-2] + (nb * block, w.shape[-1]))[
        ..., :n_in, :
    ]


def _assert_trees_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape and x.dtype == y.dtype, k
        np.testing.assert_array_equal(x, y, err_msg=k)


# ----------------------------------------------------------------------------- NF4 values


def test_nf4_values_are_the_paper_table():
    np.testing.assert_array_equal(Q.NF4_VALUES, np.asarray(PAPER_NF4, np.float32))
    assert Q.NF4_VALUES.dtype == np.float32 and len(Q.NF4_VALUES) == 16
    assert np.all(np.diff(Q.NF4_VALUES) > 0)
    # Thresholds are the float32 literals of bitsandbytes' dQuantizeNF4 (midpoints of adjacent
    # codes); exact ties go to the lower code (`x > t`).
    bnb = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544]
    bnb += [-0.23460740596055984, -0.13791173323988914, -0.045525018125772476]
    bnb += [0.03979014977812767, 0.1202552504837513, 0.2035212516784668, 0.2920137718319893]
    bnb += [0.3893125355243683, 0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
    np.testing.assert_array_equal(Q.NF4_THRESHOLDS, np.asarray(bnb, np.float32))
    for i, t in enumerate(Q.NF4_THRESHOLDS):
        assert Q._nf4_index(np, np.asarray([t]))[0] == i
        assert Q._nf4_index(np, np.asarray([np.nextafter(t, np.float32(2))]))[0] == i + 1
        assert int(Q._nf4_index(jnp, jnp.asarray([t]))[0]) == i


def test_codes_are_nearest_nf4_value():
    w = _normal((128, 96), seed=1)
    q = Q.quantize_nf4(w, double_quant=False)
    deq = np.asarray(Q.dequantize(q, jnp.float32))
    absmax = _per_element_absmax(w, 64)
    normed = w / absmax
    dist = np.abs(normed[..., None] - np.asarray(PAPER_NF4)[None, None, :])
    nearest = np.asarray(PAPER_NF4, np.float32)[np.argmin(dist, axis=-1)]
    np.testing.assert_allclose(deq, nearest * absmax, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- NF4 error


def test_nf4_roundtrip_within_bound():
    w = _normal((512, 384), seed=2)
    q = Q.quantize_nf4(w, double_quant=False)
    deq = np.asarray(Q.dequantize(q, jnp.float32))
    bound = _per_element_absmax(w, 64) * MAX_HALF_GAP * (1 + 1e-6) + 1e-7
    assert np.all(np.abs(w - deq) <= bound)
    err = _rel_fro(w, deq)
    assert 0.09 <= err <= 0.11, err


def test_double_quant_close_to_single_quant():
    w = _normal((4, 256, 640), seed=3)
    single = Q.quantize_nf4(w, double_quant=False)
    double = Q.quantize_nf4(w, double_quant=True)
    np.testing.assert_array_equal(single["nf4_codes"], double["nf4_codes"])
    # The reconstructed absmax is within half an int8 step of the true one.
    a_true = np.asarray(single["absmax"])  # [4, 4, 640]
    a_dq = np.asarray(Q.nf4_absmax(double))
    step = np.repeat(np.asarray(double["absmax_scale"]), Q.DQ_BLOCK, axis=-1)[..., :640]
    assert np.all(np.abs(a_dq - a_true) <= step * 0.5001 + 1e-6)
    # The offset is the mean of each kernel's absmax.
    np.testing.assert_allclose(
        np.asarray(double["absmax_offset"])[:, 0, 0], a_true.mean(axis=(1, 2)), rtol=1e-6
    )
    e1 = _rel_fro(w, Q.dequantize(single, jnp.float32))
    e2 = _rel_fro(w, Q.dequantize(double, jnp.float32))
    assert abs(e2 - e1) <= 0.01 * e1, (e1, e2)


def test_partial_blocks_and_other_block_sizes():
    for n_in, block in [(96, 64), (32, 64), (320, 128), (64, 16)]:
        w = _normal((n_in, 48), seed=n_in + block)
        for dq in (False, True):
            q = Q.quantize_nf4(w, block_size=block, double_quant=dq)
            assert q["nf4_codes"].shape == (n_in // 2, 48)
            deq = np.asarray(Q.dequantize(q, jnp.float32))
            assert deq.shape == (n_in, 48)
            bound = _per_element_absmax(w, block) * (MAX_HALF_GAP + (0.01 if dq else 1e-6))
            assert np.all(np.abs(w - deq) <= bound + 1e-6), (n_in, block, dq)


def test_zero_weights_quantise_to_zero():
    w = np.zeros((128, 64), np.float32)
    w[:, :3] = _normal((128, 3), seed=4)
    for bits in (4, 8):
        deq = np.asarray(Q.dequantize(Q.quantize(w, bits), jnp.float32))
        assert np.all(np.isfinite(deq))
        np.testing.assert_array_equal(deq[:, 3:], 0.0)


# ----------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("out_features,in_features", [(96, 256), (200, 128)])
def test_matches_bitsandbytes_reference(out_features, in_features):
    w_torch = _normal((out_features, in_features), seed=5) * 0.02  # HF layout [out, in]
    packed, absmax, deq = bnb_quantize_4bit(w_torch)
    q = Q.quantize_np(w_torch.T, 4, double_quant=False)  # our kernels are [in, out]
    np.testing.assert_array_equal(q["nf4_codes"], packed.reshape(out_features, -1).T)
    np.testing.assert_array_equal(q["absmax"], absmax.reshape(out_features, -1).T)
    np.testing.assert_array_equal(np.asarray(Q.dequantize(q, jnp.float32)), deq.T)
    qj = Q.quantize(jnp.asarray(w_torch.T), 4, double_quant=False)
    _assert_trees_equal(q, qj)


def test_qwix_oracle():
    qwix = pytest.importorskip("qwix")
    w = _normal((256, 128), seed=6)
    ref = np.asarray(
        qwix.dequantize(
            qwix.quantize(jnp.asarray(w), "nf4", channelwise_axes=[1], tiled_axes={0: 64})
        )
    )
    ours = np.asarray(Q.dequantize(Q.quantize_nf4(w, double_quant=False), jnp.float32))
    assert np.mean(np.abs(ours - ref) > 1e-5) < 0.01
    assert abs(_rel_fro(w, ours) - _rel_fro(w, ref)) < 0.005


# ----------------------------------------------------------------------------- int8


def test_int8_per_channel_bound():
    w = _normal((192, 80), seed=7) * np.linspace(0.01, 3.0, 80, dtype=np.float32)
    q = Q.quantize_int8(w)
    assert q["int8_values"].dtype == jnp.int8 and q["int8_values"].shape == (192, 80)
    assert q["int8_scale"].dtype == jnp.float32 and q["int8_scale"].shape == (1, 80)
    scale = np.asarray(q["int8_scale"])
    np.testing.assert_allclose(scale[0], np.abs(w).max(axis=0) / 127, rtol=1e-6)
    deq = np.asarray(Q.dequantize(q, jnp.float32))
    assert np.all(np.abs(w - deq) <= scale * 0.5 * (1 + 1e-5) + 1e-7)
    assert np.abs(np.asarray(q["int8_values"])).max() == 127
    assert _rel_fro(w, deq) < 0.01


# ----------------------------------------------------------------------------- layer axis / scan


@pytest.mark.parametrize("bits", [4, 8])
def test_leading_layer_axis_and_scan(bits):
    w = _normal((3, 128, 320), seed=8)
    q = Q.quantize(w, bits)
    for leaf in q.values():
        assert leaf.shape[0] == 3
    for layer in range(3):  # slicing axis 0 of every leaf == quantising that layer alone
        ql = Q.quantize(w[layer], bits)
        _assert_trees_equal(jax.tree.map(lambda x, i=layer: x[i], q), ql)

    def body(carry, q_layer):
        return carry, Q.dequantize(q_layer, jnp.float32)

    _, stacked = jax.jit(lambda q: jax.lax.scan(body, None, q))(q)
    # rtol: under jit XLA may fuse the double-quant `q * step + offset` into one FMA.
    np.testing.assert_allclose(stacked, Q.dequantize(q, jnp.float32), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- numpy == jax


@pytest.mark.parametrize(
    "shape,bits,dq,dtype",
    [
        ((3, 256, 384), 4, True, np.float32),
        ((2, 96, 300), 4, True, np.float32),
        ((128, 64), 4, False, np.float32),
        ((2, 128, 260), 4, True, ml_dtypes.bfloat16),
        ((2, 128, 96), 8, False, np.float32),
        ((256, 64), 8, False, ml_dtypes.bfloat16),
    ],
)
def test_numpy_and_jax_quantise_identically(shape, bits, dq, dtype):
    w = (_normal(shape, seed=9) * np.float32(0.05)).astype(dtype)
    ref = Q.quantize_np(w, bits, double_quant=dq)
    assert all(isinstance(v, np.ndarray) for v in ref.values())
    _assert_trees_equal(ref, Q.quantize(jnp.asarray(w), bits, double_quant=dq))
    jitted = jax.jit(lambda x: Q.quantize(x, bits, double_quant=dq))(jnp.asarray(w))
    _assert_trees_equal(ref, jitted)


# ----------------------------------------------------------------------------- dequantize


def test_dequantize_plain_array_is_a_cast():
    w = jnp.asarray(_normal((16, 8), seed=10))
    out = Q.dequantize(w, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(w.astype(jnp.bfloat16)))
    assert not Q.is_quantized(w) and Q.quant_kind(w) is None


def test_dequantize_dtype_rounds_once():
    q = Q.quantize_nf4(_normal((128, 64), seed=11))
    assert Q.is_quantized(q) and Q.quant_kind(q) == "nf4"
    assert Q.quant_kind(Q.quantize_int8(_normal((8, 8)))) == "int8"
    d16 = Q.dequantize(q)  # default bf16
    assert d16.dtype == jnp.bfloat16 and d16.shape == (128, 64)
    d32 = Q.dequantize(q, jnp.float32)
    np.testing.assert_array_equal(np.asarray(d16), np.asarray(d32.astype(jnp.bfloat16)))


def test_dequantize_fuses_without_fp32_copy():
    q = Q.quantize_nf4(_normal((512, 256), seed=12))
    compiled = jax.jit(lambda q: Q.dequantize(q, jnp.bfloat16)).lower(q).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("backend has no memory analysis")
    assert mem.temp_size_in_bytes < 512 * 256 * 4  # no f32 [in, out] intermediate buffer


# ----------------------------------------------------------------------------- bytes


def test_nbytes_ratios():
    w = jnp.asarray(_normal((2, 512, 1024), seed=13), jnp.bfloat16)
    base = Q.nbytes(w)
    assert base == 2 * 512 * 1024 * 2
    nf4 = Q.quantize(w, 4)
    assert Q.nbytes(nf4["nf4_codes"]) == base // 4  # 1 byte per 2 params
    r4 = Q.nbytes(nf4) / base
    r4_single = Q.nbytes(Q.quantize(w, 4, double_quant=False)) / base
    r8 = Q.nbytes(Q.quantize(w, 8)) / base
    assert r4 <= 0.3 and r4 < r4_single <= 0.2813
    assert r8 <= 0.52
    # 4 + 8/64 + 32/(64*256) bits per param (+ one fp32 offset per kernel) over 16 bits.
    assert r4 == pytest.approx((4 + 8 / 64 + 32 / (64 * 256)) / 16, rel=1e-3)
    assert Q.nbytes(Q.abstract_quantized(w.shape, w.dtype, 4)) == Q.nbytes(nf4)


# ----------------------------------------------------------------------------- abstract / tree


@pytest.mark.parametrize(
    "shape,bits,kw",
    [
        ((4, 256, 512), 4, {}),
        ((96, 300), 4, {"double_quant": False}),
        ((320, 64), 4, {"block_size": 128}),
        ((4, 256, 512), 8, {}),
    ],
)
def test_abstract_quantized_matches_quantize(shape, bits, kw):
    abstract = Q.abstract_quantized(shape, jnp.bfloat16, bits, **kw)
    real = Q.quantize(jnp.zeros(shape, jnp.bfloat16), bits, **kw)
    assert sorted(abstract) == sorted(real)
    for k in real:
        assert isinstance(abstract[k], jax.ShapeDtypeStruct)
        assert (abstract[k].shape, abstract[k].dtype) == (real[k].shape, real[k].dtype), k


def _param_tree(make):
    L, D, F, V = 2, 64, 128, 50
    return {
        "embed_tokens": {"embedding": make((V, D))},
        "layers": {
            "input_layernorm": {"scale": make((L, D))},
            "self_attn": {
                "q_proj": {"kernel": make((L, D, D)), "bias": make((L, D))},
                "o_proj": {"kernel": make((L, D, D))},
            },
            "mlp": {
                "gate_proj": {"kernel": make((L, D, F))},
                "down_proj": {"kernel": make((L, F, D))},
            },
        },
        "norm": {"scale": make((D,))},
        "lm_head": {"kernel": make((D, V))},
    }


def test_quantize_tree_default_predicate():
    params = _param_tree(lambda s: jnp.asarray(_normal(s, seed=len(s))))
    qt = Q.quantize_tree(params, 4)
    layers = qt["layers"]
    for mod in (layers["self_attn"]["q_proj"], layers["self_attn"]["o_proj"]):
        assert Q.quant_kind(mod["kernel"]) == "nf4"
    assert Q.quant_kind(layers["mlp"]["down_proj"]["kernel"]) == "nf4"
    assert layers["mlp"]["down_proj"]["kernel"]["nf4_codes"].shape == (2, 64, 64)
    # Embeddings, lm_head, norms and biases stay untouched (same objects).
    assert qt["embed_tokens"]["embedding"] is params["embed_tokens"]["embedding"]
    assert qt["lm_head"]["kernel"] is params["lm_head"]["kernel"]
    assert qt["norm"]["scale"] is params["norm"]["scale"]
    assert layers["self_attn"]["q_proj"]["bias"] is params["layers"]["self_attn"]["q_proj"]["bias"]
    # Already-quantised kernels pass through; int8 of the same tree has the int8 layout.
    again = Q.quantize_tree(qt, 8)
    assert again["layers"]["mlp"]["gate_proj"]["kernel"] is layers["mlp"]["gate_proj"]["kernel"]
    q8 = Q.quantize_tree(params, 8)
    assert Q.quant_kind(q8["layers"]["mlp"]["gate_proj"]["kernel"]) == "int8"
    assert Q.nbytes(qt) < Q.nbytes(params)


def test_quantize_tree_numpy_abstract_and_custom_predicate():
    np_params = _param_tree(lambda s: _normal(s, seed=len(s)))
    abstract = _param_tree(lambda s: jax.ShapeDtypeStruct(s, jnp.float32))
    only_mlp = lambda path: path[-1] == "kernel" and "mlp" in path  # noqa: E731
    qn = Q.quantize_tree(np_params, 4, only_mlp)
    qa = Q.quantize_tree(abstract, 4, only_mlp)
    gate = qn["layers"]["mlp"]["gate_proj"]["kernel"]
    assert all(isinstance(v, np.ndarray) for v in gate.values())
    assert not Q.is_quantized(qn["layers"]["self_attn"]["q_proj"]["kernel"])
    assert jax.tree.structure(qn) == jax.tree.structure(qa)
    for x, a in zip(jax.tree.leaves(qn), jax.tree.leaves(qa), strict=True):
        assert (x.shape, x.dtype) == (a.shape, a.dtype)
    _assert_trees_equal(
        gate, Q.quantize(jnp.asarray(np_params["layers"]["mlp"]["gate_proj"]["kernel"]), 4)
    )
    with pytest.raises(ValueError, match="kernels of shape"):
        Q.quantize_tree(np_params, 4, lambda path: path[-1] == "scale")


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    w = np.zeros((64, 8), np.float32)
    with pytest.raises(UserError, match="quantization_bit must be 4 or 8"):
        Q.quantize(w, 3)
    with pytest.raises(UserError, match="power of two"):
        Q.quantize(w, 4, block_size=48)
    with pytest.raises(UserError, match="must be even"):
        Q.quantize_np(np.zeros((63, 8), np.float32), 4)
    with pytest.raises(ValueError, match="kernels of shape"):
        Q.quantize(np.zeros((64,), np.float32), 8)
    with pytest.raises(UserError):
        Q.abstract_quantized((63, 8), jnp.bfloat16, 4)
