"""`jaxlora bench CONFIG`: tokens/s, step time, MFU, compile time and peak memory of a config.

Why this file exists: throughput claims need the step users actually train with. The benchmark
builds the model, the trainable/frozen split, the optimiser and the jitted train step with the
training code itself (the train builders, see `BenchRun`), feeds it random token batches of
exactly `per_device_train_batch_size x cutoff_len` rows per device, and times it. It prints a
human table and, last, ONE JSON line that scripts parse:

    {"tokens_per_s", "step_s", "mfu", "flops_per_token", "compile_s", "peak_mem_bytes",
     "device", "mem_source", ...}

Model source (`model_name_or_path`):
    an HF checkpoint directory or `tiny`   loaded exactly as training loads it
    random:<name>                          random weights built in memory (no download) for a
                                           built-in shape: random:llama3-8b, random:tiny-llama
    random:<path/to/config.json>           random weights for any HF config.json
Random weights are made on device under jit (normal(0.02), in the base dtype), so an 8B shape
needs no host copy; they give the same step time as real weights.

Batches: every token is real and a target (one segment per row, positions 0..T-1), i.e. a fully
packed batch; the attention FLOPs are therefore counted at S = cutoff_len (flops.py). A dataset
in the config is ignored: the benchmark measures the step, not the input pipeline. `packing:
false` runs the step as the trainer does for unpacked data (rows = one sample then padding: on a
GPU `attention: auto` then passes the padding to cuDNN as sequence lengths, no mask bias).

Timing: compile_s = trace + lower + XLA compile of the step; then `warmup` untimed steps and
`steps` timed steps, each closed with `block_until_ready`; step_s is the median (robust on a
shared machine; mean and min are printed too). MFU uses flops.py's model FLOPs and the device's
dense bf16 peak (`flops.PEAK_FLOPS`). On CPU there is no meaningful table peak, so the benchmark
measures the JAX bf16 matmul peak of this machine (`measure_matmul_peak`) and MFU is taken against
it ("peak_source": "measured").

Memory (`mem_source`): "device_peak" = `Device.memory_stats()["peak_bytes_in_use"]` (GPU/TPU);
otherwise "compiled" = XLA's `memory_analysis()` of the step (arguments + outputs + temporaries -
donated aliases); otherwise "max_rss" = the process's peak resident set size.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.bench import flops as flops_lib
from jaxlora.bench.shapes import (
    RANDOM_PREFIX,
    RandomBatches,
    random_model,
    random_shape_config,
)
from jaxlora.config import Config
from jaxlora.errors import UserError
from jaxlora.io.model import Model
from jaxlora.train import compile_cache
from jaxlora.train.model_parts import ModelParts
from jaxlora.train.step_setup import Steps

JSON_KEYS = (
    "tokens_per_s",
    "step_s",
    "mfu",
    "flops_per_token",
    "compile_s",
    "peak_mem_bytes",
    "device",
    "mem_source",
)


@dataclasses.dataclass
class BenchRun:
    """The training builders for a config without data, run directory or checkpoints: the same
    mesh, base-model placement, trainable/frozen split, optimiser and jitted train step as
    `jaxlora train` builds (`jaxlora.train.model_parts`, `jaxlora.train.step_setup`), fed by
    `RandomBatches`."""

    cfg: Config
    parts: ModelParts
    steps: Steps
    batcher: RandomBatches
    rows: int  # global rows per step

    model = property(lambda self: self.parts.model)
    frozen = property(lambda self: self.parts.frozen)
    lora_config = property(lambda self: self.parts.lora_config)
    state = property(lambda self: self.steps.state)
    train_step = property(lambda self: self.steps.train_step)

    def put_batch(self, host: dict) -> dict:
        return self.parts.put_batch(host)

    def compile_step(self, batch: dict) -> Any:
        """AOT-compiled train step (traced under the mesh context, as the loop's first call)."""
        from jaxlora.parallel import sharding

        with sharding.mesh_context(self.parts.mesh):
            return self.steps.train_step.lower(self.state, self.frozen, batch).compile()


def load_bench_parts(cfg: Config) -> ModelParts:
    """Model parts for `cfg`: random weights for `random:` specs (made in their shardings), else
    the checkpoint loaded as training loads it."""
    from jaxlora.train.model_parts import (
        build_model_parts,
        compute_dtypes,
        make_mesh,
        split_model,
    )

    spec = str(cfg.model.model_name_or_path)
    if not spec.startswith(RANDOM_PREFIX):
        from jaxlora.io.model import resolve_model_path

        return build_model_parts(cfg, resolve_model_path(spec), None)
    if cfg.model.quantization_bit:
        raise UserError(
            "quantization_bit needs checkpoint weights; benchmark QLoRA with a model "
            "directory (e.g. one written by jaxlora.io.tiny.make_tiny_model)"
        )
    from jaxlora.io.hf import abstract_params

    compute, base_dtype = compute_dtypes(cfg)
    mesh = make_mesh(cfg)
    raw = random_shape_config(spec, cfg.source)
    model = random_model(raw, base_dtype, cfg.train.seed, mesh)
    return split_model(cfg, mesh, model, abstract_params(model.config)[1], compute)


def build_bench_run(cfg: Config, total_steps: int = 100) -> BenchRun:
    """The training step builders for `cfg`, on random full-row batches."""
    from jaxlora.parallel import sharding
    from jaxlora.train.stage import LMStage
    from jaxlora.train.step_setup import build_steps

    parts = load_bench_parts(cfg)
    rows = cfg.train.per_device_train_batch_size * sharding.batch_shards(parts.mesh)
    vocab = parts.model.config.vocab_size
    batcher = RandomBatches(rows, cfg.data.cutoff_len, vocab, cfg.train.seed)
    example = dict(batcher.get(0, 0), loss_scale=np.float32(1.0))
    # A full row of one sample is both "packed" and "one sample then padding"; `packing: false`
    # says so to the step as the trainer does, so `auto` may take cuDNN's sequence-length path.
    unpacked = not cfg.data.packing
    steps = build_steps(cfg, parts, LMStage(parts, "sft"), example, total_steps, unpacked)
    return BenchRun(cfg, parts, steps, batcher, rows)


# ----------------------------------------------------------------------------- measurements


def measure_matmul_peak(
    sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5, dtype: Any = jnp.bfloat16
) -> float:
    """Best achieved FLOP/s of a jitted square `a @ b` in `dtype` on the default device."""
    best = 0.0
    for n in sizes:
        k1, k2 = jax.random.split(jax.random.key(n))
        a = jax.random.normal(k1, (n, n), dtype)
        b = jax.random.normal(k2, (n, n), dtype)
        matmul = jax.jit(lambda x, y: x @ y)
        matmul(a, b).block_until_ready()  # compile
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) else x


def peak_memory(compiled: Any) -> tuple[int | None, str]:
    """(bytes, source): device allocator peak, else XLA's estimate for the step, else max RSS."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator stats raise various errors
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device_peak"
    try:
        ma = _first(compiled.memory_analysis())
    except Exception:  # noqa: BLE001 - not implemented on every backend / version
        ma = None
    if ma is not None:
        total = (
            ma.argument_size_in_bytes
            + ma.output_size_in_bytes
            + ma.temp_size_in_bytes
            - getattr(ma, "alias_size_in_bytes", 0)
        )
        if total > 0:
            return int(total), "compiled"
    # ru_maxrss is KiB on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "max_rss"


def flop_count(cfg: Config, model: Model, lora_targets: tuple[str, ...]) -> flops_lib.FlopCount:
    f = cfg.finetune
    return flops_lib.training_flops_per_token(
        model.config,
        mode=f.finetuning_type,
        seq_len=cfg.data.cutoff_len,
        lora_rank=f.lora_rank,
        lora_targets=lora_targets,
        stage=f.stage,
    )


# ----------------------------------------------------------------------------- driver


def run_bench(
    cfg: Config,
    *,
    steps: int = 10,
    warmup: int = 2,
    matmul_sizes: tuple[int, ...] = (2048, 4096),
) -> dict[str, Any]:
    """Build and time the config's train step; returns the result dict (JSON_KEYS and more).

    `matmul_sizes`: square sizes for the CPU matmul-peak measurement (CPU only)."""
    if steps < 1 or warmup < 0:
        raise UserError(f"bench needs --steps >= 1 and --warmup >= 0; got {steps}, {warmup}")
    if cfg.finetune.stage == "dpo":
        raise UserError(
            "jaxlora bench times SFT / pretraining steps (stage sft or pt); for DPO use "
            "benchmarks/dpo_vs_sft.py"
        )
    tcfg = cfg.train
    t0 = time.perf_counter()
    run = build_bench_run(cfg, max(steps + warmup, 1))
    model = run.model
    load_s = time.perf_counter() - t0

    n_dev = jax.device_count()
    rows, seq = run.rows, cfg.data.cutoff_len
    batches = [run.put_batch(run.batcher.get(0, i)) for i in range(2)]
    state = run.state

    t0 = time.perf_counter()
    compiled = run.compile_step(batches[0])
    compile_s = time.perf_counter() - t0

    times, cpu_times = [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, run.frozen, batches[i % 2])
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    loss = float(metrics["loss_sum"]) / max(float(metrics["tokens"]), 1.0)

    targets = ()
    if run.lora_config is not None:
        targets = run.lora_config.targets
    count = flop_count(cfg, model, targets)
    step_s = statistics.median(times)
    tokens = rows * seq
    tokens_per_s = tokens / step_s
    achieved = tokens_per_s * count.per_token
    device = jax.devices()[0]
    kind = device.device_kind
    matmul_peak = None
    if device.platform == "cpu":
        matmul_peak = measure_matmul_peak(matmul_sizes)
        peak, peak_source = matmul_peak, "measured"
    else:
        per_chip = flops_lib.peak_flops(kind)
        peak = per_chip * n_dev if per_chip else None
        peak_source = "table" if per_chip else "unknown"
    mem, mem_source = peak_memory(compiled)
    return {
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        "mfu": flops_lib.mfu(tokens_per_s, count.per_token, peak),
        "flops_per_token": count.per_token,
        "compile_s": compile_s,
        "peak_mem_bytes": mem,
        "device": f"{n_dev}x {kind}",
        "mem_source": mem_source,
        "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times),
        # Process CPU seconds per step (all threads): on a shared machine a steadier basis
        # for comparing variants than wall time (thread-pool spinning is included).
        "cpu_s_per_step": statistics.median(cpu_times),
        "tokens_per_step": tokens,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "peak_source": peak_source,
        "matmul_peak_flops": matmul_peak,
        "frac_of_matmul_peak": achieved / matmul_peak if matmul_peak else None,
        "flop_formula": count.formula,
        "n_matmul_params": count.n_matmul,
        "lora_params": count.lora,
        "mode": cfg.finetune.finetuning_type,
        "batch": [rows, seq],
        "remat": cfg.model.remat,
        "compute_dtype": "bfloat16" if tcfg.bf16 else "float32",
        "final_loss": loss,
        "load_s": load_s,
        "jax": jax.__version__,
        "python": sys.version.split()[0],
    }


def format_table(r: dict[str, Any]) -> str:
    """Human-readable summary of a `run_bench` result."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    mem = r["peak_mem_bytes"]
    rows = [
        ("device", r["device"]),
        ("mode / dtype / remat", f"{r['mode']} / {r['compute_dtype']} / {r['remat']}"),
        ("batch (rows x seq)", f"{r['batch'][0]} x {r['batch'][1]}"),
        ("compile", f"{r['compile_s']:.2f} s"),
        (
            "step (median)",
            f"{r['step_s']:.4f} s  (mean {r['step_s_mean']:.4f}, min {r['step_s_min']:.4f})",
        ),
        ("tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("process CPU time", f"{r['cpu_s_per_step']:.3f} s/step"),
        ("model FLOPs/token", f"{r['flops_per_token'] / 1e9:.4f} GFLOP ({r['flop_formula']})"),
        ("achieved", f"{r['achieved_flops'] / 1e12:.3f} TFLOP/s"),
        (
            "peak",
            "n/a"
            if not r["peak_flops"]
            else f"{r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_source']})",
        ),
        ("MFU", pct(r["mfu"])),
        (
            "peak memory",
            "n/a" if mem is None else f"{mem / 2**20:,.0f} MiB ({r['mem_source']})",
        ),
        ("final loss", f"{r['final_loss']:.4f}"),
    ]
    if r.get("matmul_peak_flops"):
        rows.append(("JAX bf16 matmul peak", f"{r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s"))
        rows.append(("achieved / matmul peak", pct(r["frac_of_matmul_peak"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_bench_cli(
    cfg: Config, *, steps: int = 10, warmup: int = 2, matmul_sizes: tuple[int, ...] = (2048, 4096)
) -> int:
    """`jaxlora bench`: print the table, then the JSON line (last line of stdout)."""
    for key, why in cfg.ignored.items():
        print(f"note: ignoring `{key}` ({why})", file=sys.stderr)
    compile_cache.enable(cfg.train.compile_cache)
    result = run_bench(cfg, steps=steps, warmup=warmup, matmul_sizes=matmul_sizes)
    print(format_table(result))
    print(json.dumps(result), flush=True)
    return 0
