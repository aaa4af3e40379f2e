"""`jaxlora bench CONFIG --lower-for tpu|cuda --hlo-out FILE`: the train step lowered for another
platform, on this host, without that device and without the model's weights.

Why this file exists: the accelerator attention kernels (splash on TPU, cuDNN / Pallas on GPU)
only show up in a program lowered for that platform. This builds the same train step as
`jaxlora bench` (the `_BenchRun` builders: LoRA split, optimiser, jitted step), but with the
frozen base as `jax.ShapeDtypeStruct`s (`io.hf.abstract_params`: no 16 GB of bf16 weights), the
attention choice made for the target platform, and exports it with
`jax.export.export(..., platforms=(platform,))`. The StableHLO text goes to FILE; the summary
(kernel custom calls, fp32 T x T score buffers) is printed as one JSON line.

What lowers where (JAX 0.10-0.12, CPU-only jaxlib):
  * tpu: works. Splash attention is a Mosaic kernel: `tpu_custom_call` in the module.
  * cuda: the dense XLA path and the Pallas/Triton kernel lower (`__gpu$xla.gpu.triton`
    custom calls: forward, dq and dk/dv kernels; also on a mesh, per device). cuDNN attention
    does not: its lowering asks the local CUDA runtime for the cuDNN version ("cuDNN is not
    detected"), reported as a UserError naming the kernel.
Only `random:<shape>` models are supported (a checkpoint would have to be read).

A multi-device mesh (`mesh: {fsdp: 2, tensor: 2}` ...) lowers the partitioned step for that
many chips: host CPU devices stand in for them (`XLA_FLAGS=--xla_force_host_platform_device_
count=N`; the device count is fixed when JAX starts), the frozen base takes the training
shardings, and the module records `mhlo.num_partitions = N`. What it can show without the chips:
the kernel sits in an `sdy.manual_computation` (the shard_map of models/attention.py) and its
operands are the per-device shapes (`kernel_q_shapes`: splash [1 row, N/tensor, T, Dh]), so
the kernel itself needs no gathered q/k/v. Which collectives XLA's SPMD partitioner then adds
around it is decided when compiling for TPU, which a CPU host cannot do; the same program
compiled for the 4 CPU devices has no all-gather in the attention (tests/test_flash_sharded.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlora.bench.measure import BenchRun
from jaxlora.bench.shapes import RANDOM_PREFIX, RandomBatches, random_shape_config
from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.io.model import Model
from jaxlora.models.config import config_from_hf
from jaxlora.train.methods import attention_spec

PLATFORMS = {"tpu": "tpu", "cuda": "cuda", "gpu": "cuda"}
# Kernel custom calls as they appear in lowered StableHLO, by target platform.
TRITON = "__gpu$xla.gpu.triton"
KERNEL_CALLS = {"tpu": ("tpu_custom_call",), "cuda": (TRITON, "cudnn")}


def build_lowering_run(cfg: Config, platform: str) -> BenchRun:
    """`build_bench_run` with an abstract frozen base and the attention chosen for `platform`."""
    from jaxlora.io.hf import abstract_params
    from jaxlora.parallel import sharding
    from jaxlora.train.model_parts import compute_dtypes, make_mesh, split_model
    from jaxlora.train.stage import LMStage
    from jaxlora.train.step_setup import build_steps

    spec = str(cfg.model.model_name_or_path)
    if not spec.startswith(RANDOM_PREFIX) or cfg.model.quantization_bit:
        raise UserError(
            "--lower-for needs a random:<shape> model without quantization_bit "
            f"(got model_name_or_path {spec!r}, quantization_bit {cfg.model.quantization_bit})"
        )
    compute, base_dtype = compute_dtypes(cfg)
    mesh = make_mesh(cfg)
    raw = random_shape_config(spec, cfg.source)
    mcfg = config_from_hf(raw, "random model config")
    shapes, logical = abstract_params(mcfg, base_dtype)
    if mesh.size > 1:  # each leaf as training places it (parallel/sharding.py)
        placed = sharding.param_shardings(mesh, logical, shapes)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placed = jax.tree_util.tree_map(lambda _: device, shapes)
    params = jax.tree_util.tree_map(
        lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, placed
    )
    model = Model(config=mcfg, params=params, dtype=base_dtype, raw_config=raw)
    parts = split_model(cfg, mesh, model, logical, compute)
    parts.model.attention = attention_spec(cfg, "gpu" if platform == "cuda" else platform)
    rows = cfg.train.per_device_train_batch_size * sharding.batch_shards(mesh)
    batcher = RandomBatches(rows, cfg.data.cutoff_len, mcfg.vocab_size, cfg.train.seed)
    example = dict(batcher.get(0, 0), loss_scale=np.float32(1.0))
    steps = build_steps(cfg, parts, LMStage(parts, "sft"), example, 10)
    return BenchRun(cfg, parts, steps, batcher, rows)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def square_f32(text: str, t: int) -> list[tuple[int, ...]]:
    """Distinct shapes of fp32 tensors in `text` whose two minor dims are T x T."""
    found = re.findall(rf"tensor<((?:\d+x)*){t}x{t}xf32>", text)
    return sorted({(*(int(d) for d in p.split("x") if d), t, t) for p in found})


def score_buffers(shapes: list[tuple[int, ...]], heads: int, kv_heads: int) -> list[tuple]:
    """The T x T shapes that carry a head axis right before T x T: [.., N|K, T, T] or
    [.., K, G, T, T] -- attention scores/probabilities. (A [L, B, T, D] activation stack has the
    same minor dims when D == T, as in Llama-3-8B at T = 4096, but no head axis there.)"""
    groups = heads // kv_heads
    out = []
    for s in shapes:
        if len(s) < 4:
            continue
        if s[-3] in (heads, kv_heads) or (len(s) >= 5 and s[-4:-2] in ((kv_heads, groups),)):
            out.append(s)
    return out


def kernel_q_shapes(text: str) -> list[str]:
    """Distinct q shapes entering the kernel functions as lowered: splash `[1, N, T, Dh]` (one
    row: the kernel is vmapped over rows), the Pallas GPU kernel `mha` `[B, T, N, Dh]`; on a
    mesh these are per device (inside the shard_map)."""
    fn = r"func\.func private @(?:_splash_attention\w*|mha)"
    return sorted(set(re.findall(fn + r"\(%arg0: tensor<((?:\d+x){3}\d+)x\w+>", text)))


def lower_step(cfg: Config, platform: str) -> tuple[str, dict[str, Any]]:
    """(StableHLO text, summary) of the config's train step lowered for `platform`."""
    target = PLATFORMS.get(platform)
    if target is None:
        raise UserError(f"--lower-for must be one of tpu, cuda; got {platform!r}")
    try:
        run = build_lowering_run(cfg, target)
    except UserError as e:
        if "devices" not in str(e) or jax.device_count() > 1:
            raise
        raise UserError(
            f"{e}. --lower-for lowers a multi-device mesh on host CPU devices: start it with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size>"
        ) from None
    batch = run.put_batch(run.batcher.get(0, 0))
    args = (_abstract(run.state), _abstract(run.frozen), _abstract(batch))
    from jaxlora.parallel import sharding

    try:
        with sharding.mesh_context(run.parts.mesh):
            exported = jax.export.export(
                run.train_step.jitted,
                platforms=(target,),
                # Triton kernels have no serialisation guarantee; this module is for reading.
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
            )(*args)
    except Exception as e:  # a kernel that cannot lower for `target` on this host
        kernel = run.model.attention.kernel
        raise UserError(
            f"--lower-for {platform}: lowering failed with attention={kernel!r} on this host "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); see jaxlora/bench/lower.py"
        ) from None
    text = exported.mlir_module()
    t = cfg.data.cutoff_len
    square, mc = square_f32(text, t), run.model.config
    summary = {
        "platform": target,
        "attention": cfg.model.attention,
        "seq_len": t,
        "batch": run.rows,
        "kernel_custom_calls": {c: text.count(c) for c in KERNEL_CALLS[target]},
        "f32_TxT_tensors": ["x".join(map(str, x)) for x in square],
        "f32_score_buffers": [
            "x".join(map(str, x))
            for x in score_buffers(square, mc.num_attention_heads, mc.num_key_value_heads)
        ],
        "hlo_chars": len(text),
        "mesh": dict(run.parts.mesh.shape),
        "num_partitions": run.parts.mesh.size,
        "kernel_q_shapes": kernel_q_shapes(text),
    }
    return text, summary


def run_lower_cli(cfg: Config, platform: str, hlo_out: str | None) -> int:
    """Write the lowered module to `hlo_out` (if given) and print the summary JSON line."""
    text, summary = lower_step(cfg, platform)
    if hlo_out:
        Path(hlo_out).write_text(text)
        summary["hlo_out"] = str(hlo_out)
    print(json.dumps(summary), flush=True)
    return 0
