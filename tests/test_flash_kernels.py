"""Accelerator attention kernels (models/flash.py) in the Pallas interpreter vs the dense reference.

Splash (TPU) and the Pallas GPU kernel run here with `interpret=True`: same kernel code, same
numerics, any backend. Cases: packed segments + padding, GQA, sliding window, fp32 and bf16,
forward and q/k/v gradients. Shapes are tiny because the interpreter is slow. cuDNN has no
interpreter; benchmarks/device_check.sh checks it on a GPU.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import attention as A
from jaxlora.models import flash

DEMO = __import__("pathlib").Path(jaxlora.__file__).parent / "demo_data" / "identity_sft.json"

B, N, K, DH = 2, 4, 2, 64
T_SPLASH = 384  # three 128-row blocks: the kernel's block skipping and segment handling matter
T_PALLAS = 256


def _inputs(t: int, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (B, t, N, DH), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, t, K, DH), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, t, K, DH), jnp.float32).astype(dtype)
    g = jax.random.normal(ks[3], (B, t, N, DH), jnp.float32)
    # Row 0: three packed samples (one crossing a block edge) then padding; row 1: one sample.
    a, b = int(t * 0.26), int(t * 0.39)
    seg = jnp.asarray([[1] * a + [2] * b + [3] * (t - a - b - 30) + [0] * 30, [1] * t], jnp.int32)
    return q, k, v, g, seg


def _dense(q, k, v, seg, window, scale):
    return jax.nn.dot_product_attention(q, k, v, mask=A.causal_mask(seg, window), scale=scale)


def _value_and_grads(fn, q, k, v, g, seg):
    real = (seg != 0)[:, :, None, None]  # padding rows' outputs are never used

    def loss(q, k, v):
        return jnp.sum(jnp.where(real, fn(q, k, v).astype(jnp.float32) * g, 0.0))

    out = jax.jit(fn)(q, k, v).astype(jnp.float32)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return jnp.where(real, out, 0.0), [x.astype(jnp.float32) for x in grads]


def _rel(x, y) -> float:
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def _kernel(name, seg, window, scale):
    if name == "splash":
        return lambda q, k, v: flash.splash(q, k, v, seg, scale, window, True)
    return lambda q, k, v: flash.pallas_gpu(q, k, v, seg, scale, True)


CASES = [("splash", T_SPLASH, None), ("splash", T_SPLASH, 70), ("pallas", T_PALLAS, None)]


@pytest.mark.parametrize("name,t,window", CASES)
def test_kernel_fp32_matches_dense_value_and_grads(name, t, window):
    q, k, v, g, seg = _inputs(t)
    scale = DH**-0.5
    got = _value_and_grads(_kernel(name, seg, window, scale), q, k, v, g, seg)
    want = _value_and_grads(lambda q, k, v: _dense(q, k, v, seg, window, scale), q, k, v, g, seg)
    assert _rel(got[0], want[0]) <= 1e-5
    for x, y in zip(got[1], want[1], strict=True):
        assert float(jnp.abs(y).max()) > 0
        assert _rel(x, y) <= 1e-5


@pytest.mark.parametrize("window", [None, 70])
def test_splash_soft_cap_matches_dense_soft_capped(window):
    """Gemma 2's attention logit soft-cap in splash (the kernel's attn_logits_soft_cap) equals
    the model's dense `c * tanh(scale * q.k / c)` path, forward and q/k/v gradients."""
    q, k, v, g, seg = _inputs(T_SPLASH)
    q = q * 3.0  # scores well past the cap (c = 5): tanh saturates, so a missing cap shows
    scale, cap = DH**-0.5, 5.0

    def kernel(q, k, v):
        return flash.splash(q, k, v, seg, scale, window, True, softcap=cap)

    def dense(q, k, v):
        return A._softcapped(q, k, v, A.causal_mask(seg, window), scale, cap)

    got = _value_and_grads(kernel, q, k, v, g, seg)
    want = _value_and_grads(dense, q, k, v, g, seg)
    assert _rel(got[0], want[0]) <= 1e-5
    for x, y in zip(got[1], want[1], strict=True):
        assert float(jnp.abs(y).max()) > 0
        assert _rel(x, y) <= 1e-5


@pytest.mark.parametrize("name,t,window", [CASES[1], CASES[2]])
def test_kernel_bf16_within_dense_bf16_error(name, t, window):
    q32, k32, v32, g, seg = _inputs(t)
    scale = DH**-0.5
    exact = _value_and_grads(lambda *a: _dense(*a, seg, window, scale), q32, k32, v32, g, seg)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    dense16 = _value_and_grads(lambda *a: _dense(*a, seg, window, scale), q, k, v, g, seg)
    got = _value_and_grads(_kernel(name, seg, window, scale), q, k, v, g, seg)
    for x, d, e in zip(
        [got[0], *got[1]], [dense16[0], *dense16[1]], [exact[0], *exact[1]], strict=True
    ):
        assert bool(jnp.all(jnp.isfinite(x)))
        assert _rel(x, e) <= 2 * _rel(d, e) + 1e-3


def test_select_auto_per_platform_and_announced_fallbacks(caplog, monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    spec = A.AttentionSpec
    assert A.select(spec(platform="tpu"), 4096, bf16, 128, None)[0] == "splash"
    # GPU: cuDNN for rows that are one sample then padding (lengths, no mask) on any JAX.
    assert A.select(spec(platform="gpu", right_padded=True), 4096, bf16, 128, None)[0] == "cudnn"
    # Packed rows (segment ids as a [B, 1, T, T] bias): cuDNN on JAX >= 0.11.1 while the bias
    # fits in CUDNN_BIAS_BYTES per device, else the Pallas kernel, saying why.
    monkeypatch.setattr(jax, "__version_info__", (0, 11, 2))
    kernel, why = A.select(spec(platform="gpu"), 4096, bf16, 128, None, batch=32)
    assert kernel == "cudnn" and "mask bias" in why  # 32 x 4096^2 x 2 bytes = 1 GiB
    kernel, why = A.select(spec(platform="gpu"), 4096, bf16, 128, None, batch=33)
    assert kernel == "pallas" and "1.0 GiB per device" in why
    monkeypatch.setattr(jax, "__version_info__", (0, 11, 0))
    kernel, why = A.select(spec(platform="gpu"), 4096, bf16, 128, None)
    assert kernel == "pallas" and "JAX >= 0.11.1" in why
    kernel, why = A.select(spec("cudnn", platform="gpu"), 4096, bf16, 128, None)
    assert kernel == "cudnn" and "mask bias" in why  # asked for by name: any JAX
    assert A.select(spec(platform="cpu"), 4096, f32, 128, None)[0] == "block"
    assert A.select(spec(platform="cpu"), 64, f32, 128, None)[0] == "xla"
    # fp32 on a GPU: cuDNN cannot, the Pallas kernel can.
    assert A.select(spec(platform="gpu"), 4096, f32, 128, None)[0] == "pallas"
    # fp32 + sliding window on a GPU: neither; dense, with both reasons.
    kernel, why = A.select(spec(platform="gpu", right_padded=True), 4096, f32, 128, 512)
    assert kernel == "xla" and "bf16/fp16" in why and "sliding window" in why
    kernel, why = A.select(spec(platform="gpu"), 4096, bf16, 128, 512)  # packed + window
    assert kernel == "xla" and "JAX >= 0.11.1" in why and "sliding window" in why
    monkeypatch.undo()
    kernel, why = A.select(spec("splash", platform="tpu"), 1000, bf16, 128, None)
    assert kernel == "xla" and "T % 128" in why
    kernel, why = A.select(spec("splash"), 4096, f32, 128, None)  # on this CPU, no interpreter
    assert kernel == "block" and "needs a TPU" in why
    assert A.select(spec("splash", interpret=True), 256, f32, 64, None)[0] == "splash"
    assert A.select(spec("xla", platform="tpu"), 4096, bf16, 128, None)[0] == "xla"

    A._announced.clear()
    q, k, v, _, seg = _inputs(128)
    with caplog.at_level(logging.INFO, logger="jaxlora.attention"):
        for _ in range(2):
            A.attention(q, k, v, scale=0.1, segment_ids=seg, spec=spec("splash"))
    lines = [r.getMessage() for r in caplog.records if r.name == "jaxlora.attention"]
    assert len(lines) == 1 and "xla kernel" in lines[0] and "splash needs a TPU" in lines[0]
    assert caplog.records[0].levelno == logging.WARNING


def _tiny_bench_cfg(tmp_path, **kw):
    import json as _json

    from jaxlora.config import config_from_dict

    raw = {  # hidden 96 != T, so a [B, T, D] activation never looks like T x T scores
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 96,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
    }
    (tmp_path / "config.json").write_text(_json.dumps(raw))
    base = dict(
        model_name_or_path=f"random:{tmp_path / 'config.json'}",
        lora_rank=4,
        cutoff_len=256,
        packing=True,
        per_device_train_batch_size=1,
        bf16=True,
    )
    return config_from_dict({**base, **kw})


@pytest.mark.slow
def test_lower_for_tpu_shows_splash_and_no_score_buffers(tmp_path):
    from jaxlora.bench.lower import lower_step

    text, summary = lower_step(_tiny_bench_cfg(tmp_path), "tpu")
    assert summary["kernel_custom_calls"]["tpu_custom_call"] >= 2  # forward + fused backward
    assert summary["f32_score_buffers"] == [] and summary["f32_TxT_tensors"] == []
    dense = lower_step(_tiny_bench_cfg(tmp_path, attention="xla"), "tpu")[1]
    assert dense["kernel_custom_calls"]["tpu_custom_call"] == 0
    assert dense["f32_score_buffers"]  # the dense reference does build [.., N, T, T] scores


@pytest.mark.slow
def test_train_steps_with_splash_interpret_equal_xla(tiny_model_dir, tmp_path, caplog):
    """`jaxlora train` with attention=splash (Pallas interpreter) logs the same losses as xla."""
    import json as _json

    from jaxlora.config import config_from_dict
    from jaxlora.train.loop import train

    def run(name, **kw):
        cfg = config_from_dict(
            dict(
                model_name_or_path=str(tiny_model_dir),
                dataset=str(DEMO),
                cutoff_len=128,
                packing=True,
                max_samples=24,
                per_device_train_batch_size=2,
                max_steps=3,
                logging_steps=1,
                learning_rate=1e-3,
                bf16=False,
                plot_loss=False,
                output_dir=str(tmp_path / name),
                **kw,
            )
        )
        train(cfg, progress=False, log=lambda s: None)
        rows = [
            _json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        return [r["train/loss"] for r in rows if "train/loss" in r]

    A._announced.clear()
    with caplog.at_level(logging.INFO, logger="jaxlora.attention"):
        splash = run("splash", attention="splash", attention_interpret=True)
    assert any("splash kernel" in r.getMessage() for r in caplog.records)
    dense = run("xla", attention="xla")
    assert len(dense) == 3
    np.testing.assert_allclose(splash, dense, rtol=1e-5)


@pytest.mark.parametrize("right_padded", [True, False])
def test_cudnn_call_semantics_match_dense(monkeypatch, right_padded):
    """What flash.cudnn asks of `jax.nn.dot_product_attention` (sequence lengths for right-padded
    rows, incl. a dummy all-padding row; else the same-segment mask; causal; window) means the
    same attention as the dense reference. Checked through the API's XLA implementation (cuDNN
    implements the same contract and cannot run here): outputs at real rows and q/k/v grads."""
    calls = []
    api = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kw):
        calls.append((implementation, sorted(k for k, v in kw.items() if v is not None)))
        return api(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    t, window, scale = 128, 40, DH**-0.5
    q, k, v, g, packed = _inputs(t)
    rows = jnp.asarray([[1] * 90 + [0] * 38, [0] * t], jnp.int32)  # one sample + pad; dummy row
    seg = rows if right_padded else packed
    got = _value_and_grads(
        lambda q, k, v: flash.cudnn(q, k, v, seg, scale, window, right_padded), q, k, v, g, seg
    )
    monkeypatch.setattr(jax.nn, "dot_product_attention", api)
    want = _value_and_grads(lambda q, k, v: _dense(q, k, v, seg, window, scale), q, k, v, g, seg)
    used = "query_seq_lengths" if right_padded else "mask"
    assert calls and all(c[0] == "cudnn" and used in c[1] for c in calls), calls
    assert _rel(got[0], want[0]) <= 1e-5
    for x, y in zip(got[1], want[1], strict=True):
        assert bool(jnp.all(jnp.isfinite(x)))
        assert _rel(x, y) <= 1e-5


def test_shape_only_init_traces_log_no_kernel_line(caplog, monkeypatch):
    """Parameter-shape traces (`abstract_params`, the bench's random init) run an 8-token dummy
    row; they must not announce a kernel (on a GPU that was a misleading "fallback" warning)."""
    from jaxlora.io.hf import abstract_params
    from jaxlora.models.config import config_from_hf

    monkeypatch.setattr(A, "_announced", set())
    cfg = config_from_hf(
        dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        "test",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="jaxlora.attention"):
        abstract_params(cfg)
    assert not [r for r in caplog.records if r.name == "jaxlora.attention"]
